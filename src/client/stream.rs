//! Streaming calls: [`CallStream`].

use std::{fmt, marker::PhantomData, time::Instant};

use futures::{AsyncReadExt as _, AsyncWriteExt as _};
use serde::{Serialize, de::DeserializeOwned};

use super::{
    CallOptions, Client, Error,
    call::{client_span, head, outcome_of, receive, send_all},
};
use crate::{
    PeerId,
    codec::{Codec as _, ContentType},
    selector::Selected,
    transport::{
        frame,
        wire::{CallKind, DataFrame, Frame},
    },
};

/// A streaming call in progress: send requests, close the sending side, receive responses
/// until the server's trailer.
///
/// End of stream is explicit both ways: [`CallStream::close_send`] sends the end frame, and
/// [`CallStream::recv`] returns `None` only after the server's successful trailer; a failed
/// call ends with `Some(Err(..))` carrying the server's status.
pub struct CallStream<Req, Resp> {
    reader: futures::io::ReadHalf<libp2p::Stream>,
    writer: futures::io::WriteHalf<libp2p::Stream>,
    codec: ContentType,
    max: usize,
    peer: PeerId,
    deadline: Instant,
    sent_end: bool,
    done: bool,
    selected: Option<Selected>,
    started: Instant,
    /// The call's client span: it ends when the stream is dropped.
    span: tracing::Span,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req, Resp> fmt::Debug for CallStream<Req, Resp> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallStream")
            .field("peer", &self.peer)
            .field("sent_end", &self.sent_end)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<Req: Serialize, Resp: DeserializeOwned> CallStream<Req, Resp> {
    /// The peer serving the call.
    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    /// Sends one request message.
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] if it cannot be encoded or is too large, [`Error::Send`] if the
    /// stream is closed (the server may have ended the call: [`CallStream::recv`] tells how).
    pub async fn send(&mut self, request: &Req) -> Result<(), Error> {
        if self.sent_end {
            return Err(Error::Send {
                peer: self.peer,
                reason: "the sending side was already closed".into(),
            });
        }
        // The message is encoded straight into its frame.
        let mut body = DataFrame::buffer();
        self.codec
            .encode_into(request, &mut body)
            .map_err(|e| Error::Encode(e.to_string()))?;
        let len = DataFrame::body_len(&body);
        if len > self.max {
            return Err(Error::Encode(format!(
                "a message of {len} bytes exceeds the limit of {} bytes",
                self.max
            )));
        }
        let data = DataFrame::new(body).map_err(|e| Error::Encode(e.to_string()))?;
        frame::write_buf(&mut self.writer, data.bytes())
            .await
            .map_err(|e| Error::Send {
                peer: self.peer,
                reason: e.to_string(),
            })
    }

    /// Ends the sending side: the server's request stream ends after the messages sent.
    ///
    /// # Errors
    ///
    /// [`Error::Send`] if the stream is closed.
    pub async fn close_send(&mut self) -> Result<(), Error> {
        if self.sent_end {
            return Ok(());
        }
        self.sent_end = true;
        send_all(&mut self.writer, self.peer, &[Frame::End]).await
    }

    /// The next response; `None` after the server's successful end of the call.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: a response may be partly read when the future is dropped.
    pub async fn recv(&mut self) -> Option<Result<Resp, Error>> {
        if self.done {
            return None;
        }
        let peer = self.peer;
        let next = tokio::time::timeout_at(
            self.deadline.into(),
            receive(&mut self.reader, peer, self.max),
        )
        .await
        .unwrap_or(Err(Error::Timeout {
            peer: Some(peer),
            after: self.deadline.saturating_duration_since(self.started),
        }));
        let result = match next {
            Ok(Frame::Data(body)) => {
                return Some(self.codec.decode(&body).map_err(|e| Error::Receive {
                    peer,
                    reason: format!("cannot decode a response: {e}"),
                }));
            }
            Ok(Frame::Trailer(trailer)) => {
                let status = trailer.status();
                if status.is_ok() {
                    Ok(())
                } else {
                    Err(Error::Remote {
                        peer,
                        status: Box::new(status),
                    })
                }
            }
            Ok(_) => Err(Error::Receive {
                peer,
                reason: "unexpected frame in a response stream".into(),
            }),
            Err(e) => Err(e),
        };
        self.done = true;
        self.span.record(
            "rpc.response.status_code",
            match &result {
                Ok(()) => crate::status::Code::Ok.as_u16(),
                Err(e) => e.status().code().as_u16(),
            },
        );
        let _ = self.writer.close().await;
        if let Some(selected) = self.selected.take() {
            selected.finish(outcome_of(&result, self.started));
        }
        result.err().map(Err)
    }

    /// For client streams: closes the sending side and returns the single response.
    ///
    /// # Errors
    ///
    /// The call's error, or [`Error::Receive`] if the server sent no response or more than one.
    pub async fn finish(mut self) -> Result<Resp, Error> {
        self.close_send().await?;
        let response = match self.recv().await {
            Some(result) => result?,
            None => {
                return Err(Error::Receive {
                    peer: self.peer,
                    reason: "the call ended without a response".into(),
                });
            }
        };
        match self.recv().await {
            None => Ok(response),
            Some(Err(e)) => Err(e),
            Some(Ok(_)) => Err(Error::Receive {
                peer: self.peer,
                reason: "a client-streaming call answered more than once".into(),
            }),
        }
    }
}

impl Client {
    async fn open_stream<Req, Resp>(
        &self,
        service: &str,
        endpoint: &str,
        kind: CallKind,
        first: Option<Vec<u8>>,
        options: CallOptions,
    ) -> Result<CallStream<Req, Resp>, Error> {
        let started = Instant::now();
        let deadline = options.deadline_from(started);
        let (trace, span) = client_span(service, endpoint, &options);
        let mut tried = Vec::new();
        let mut attempt = 0;
        // Only opening is retried: once messages flow, a stream is not safe to replay.
        let (selected, stream) = loop {
            let result = async {
                let selected = self.pick(service, &options, &tried).await?;
                match self.open(&selected, &options).await {
                    Ok((stream, _)) => Ok((selected, stream)),
                    Err(e) => {
                        tried.push(selected.peer_id());
                        selected.finish(crate::selector::Outcome::Failure);
                        Err(e)
                    }
                }
            }
            .await;
            match result {
                Ok(opened) => break opened,
                Err(e)
                    if attempt < options.retries
                        && (options.retry)(&e)
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(options.backoff.saturating_mul(1 << attempt.min(16))).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        };
        let peer = selected.peer_id();
        if !span.is_disabled() {
            span.record("peer", &*self.inner.peer_text(peer));
        }
        let (reader, mut writer) = stream.split();
        let mut frames = vec![head(service, endpoint, kind, &options, &trace, deadline)];
        if let Some(body) = first {
            frames.push(Frame::Data(body));
            frames.push(Frame::End);
        }
        let sent_end = frames.len() > 1;
        send_all(&mut writer, peer, &frames).await?;
        Ok(CallStream {
            reader,
            writer,
            codec: options.content_type,
            max: self.inner.config.max_message,
            peer,
            deadline,
            sent_end,
            done: false,
            selected: Some(selected),
            started,
            span,
            _types: PhantomData,
        })
    }

    /// Opens a bidirectional stream to `endpoint` of `service`.
    ///
    /// # Errors
    ///
    /// Resolving, selecting or connecting failed (each retried on another node as the
    /// options allow).
    pub async fn stream<Req, Resp>(
        &self,
        service: &str,
        endpoint: &str,
        options: CallOptions,
    ) -> Result<CallStream<Req, Resp>, Error>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        self.open_stream(service, endpoint, CallKind::Bidi, None, options)
            .await
    }

    /// Calls a server-streaming endpoint: one request, then [`CallStream::recv`] the responses.
    ///
    /// # Errors
    ///
    /// As [`Client::stream`], and [`Error::Encode`] for the request.
    pub async fn server_stream<Req, Resp>(
        &self,
        service: &str,
        endpoint: &str,
        request: &Req,
        options: CallOptions,
    ) -> Result<CallStream<Req, Resp>, Error>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let body = options
            .content_type
            .encode(request)
            .map_err(|e| Error::Encode(e.to_string()))?;
        if body.len() > self.inner.config.max_message {
            return Err(Error::Encode(format!(
                "the request is {} bytes, the limit is {} bytes",
                body.len(),
                self.inner.config.max_message
            )));
        }
        self.open_stream(
            service,
            endpoint,
            CallKind::ServerStream,
            Some(body),
            options,
        )
        .await
    }

    /// Opens a client-streaming call: [`CallStream::send`] requests, then
    /// [`CallStream::finish`] for the response.
    ///
    /// # Errors
    ///
    /// As [`Client::stream`].
    pub async fn client_stream<Req, Resp>(
        &self,
        service: &str,
        endpoint: &str,
        options: CallOptions,
    ) -> Result<CallStream<Req, Resp>, Error>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        self.open_stream(service, endpoint, CallKind::ClientStream, None, options)
            .await
    }
}
