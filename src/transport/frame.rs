//! Length-prefixed frames: a 4-byte big-endian length, then the payload.

use futures::{AsyncReadExt as _, AsyncWriteExt as _};

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The stream ended cleanly before a new frame began.
    #[error("the stream ended")]
    Eof,
    /// The announced length is above the limit; the payload was not read.
    #[error("a frame of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The length prefix of a frame whose payload is `len` bytes.
pub(crate) fn prefix(len: usize) -> std::io::Result<[u8; 4]> {
    u32::try_from(len)
        .map(u32::to_be_bytes)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "frame over 4 GiB"))
}

/// Writes one frame and flushes.
pub(crate) async fn write<S: futures::AsyncWrite + Unpin>(
    stream: &mut S,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4 + payload.len());
    buf.extend_from_slice(&prefix(payload.len())?);
    buf.extend_from_slice(payload);
    write_buf(stream, &buf).await
}

/// Writes frames already laid out in `buf` (each with its length prefix) with one write and
/// one flush: one muxer frame, one packet, where a write per frame would cost a system call
/// each.
pub(crate) async fn write_buf<S: futures::AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &[u8],
) -> std::io::Result<()> {
    stream.write_all(buf).await?;
    stream.flush().await
}

/// Reads one frame of at most `max` bytes. A larger announced length is an error before any
/// payload is read or allocated; a stream that ends inside a frame is an I/O error.
pub(crate) async fn read<S: futures::AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> Result<Vec<u8>, ReadError> {
    let size = read_len(stream, max).await?;
    Ok(read_to(stream, Vec::new(), size).await?)
}

/// How far ahead of the bytes received a reader allocates.
const READ_AHEAD: usize = 64 * 1024;

/// Appends to `buf` until it holds `size` bytes, allocating as they arrive (at most
/// [`READ_AHEAD`] beyond them): a length prefix alone, from a peer that then sends nothing,
/// does not make the reader allocate the whole frame.
///
/// # Errors
///
/// The stream's errors; `UnexpectedEof` if it ends first.
pub(crate) async fn read_to<S: futures::AsyncRead + Unpin>(
    stream: &mut S,
    mut buf: Vec<u8>,
    size: usize,
) -> std::io::Result<Vec<u8>> {
    while buf.len() < size {
        let start = buf.len();
        if start >= READ_AHEAD && buf.capacity() < size {
            // The peer is sending the frame: room for the rest at once, not by doublings.
            buf.reserve_exact(size - start);
        }
        buf.resize(start + (size - start).min(READ_AHEAD), 0);
        match stream.read(&mut buf[start..]).await? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => buf.truncate(start + n),
        }
    }
    Ok(buf)
}

/// Reads a frame's length prefix, and checks it against `max`.
pub(crate) async fn read_len<S: futures::AsyncRead + Unpin>(
    stream: &mut S,
    max: usize,
) -> Result<usize, ReadError> {
    let mut len = [0u8; 4];
    let mut filled = 0;
    while filled < 4 {
        match stream.read(&mut len[filled..]).await? {
            0 if filled == 0 => return Err(ReadError::Eof),
            0 => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            n => filled += n,
        }
    }
    let size = u32::from_be_bytes(len) as usize;
    if size > max {
        return Err(ReadError::TooLarge { size, max });
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that sends a length prefix and a few bytes, then nothing: records the largest
    /// buffer it was asked to fill.
    struct Stalling {
        sent: Vec<u8>,
        largest_ask: usize,
    }

    impl futures::AsyncRead for Stalling {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.largest_ask = self.largest_ask.max(buf.len());
            if self.sent.is_empty() {
                return std::task::Poll::Pending;
            }
            let n = buf.len().min(self.sent.len());
            buf[..n].copy_from_slice(&self.sent[..n]);
            self.sent.drain(..n);
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn a_length_prefix_alone_does_not_allocate_its_frame() {
        use futures::FutureExt as _;
        let mut peer = Stalling {
            sent: [&(1u32 << 20).to_be_bytes()[..], b"abc"].concat(),
            largest_ask: 0,
        };
        assert!(
            read(&mut peer, 2 << 20).now_or_never().is_none(),
            "still waiting"
        );
        assert!(
            peer.largest_ask <= READ_AHEAD,
            "asked for {}",
            peer.largest_ask
        );
    }

    #[tokio::test]
    async fn frames_round_trip_and_bad_lengths_are_refused() {
        let mut buf = Vec::new();
        write(&mut buf, b"hello").await.unwrap();
        assert_eq!(buf, b"\x00\x00\x00\x05hello");
        assert_eq!(read(&mut &buf[..], 5).await.unwrap(), b"hello");
        assert!(matches!(
            read(&mut &buf[..], 4).await,
            Err(ReadError::TooLarge { size: 5, max: 4 })
        ));
        // A 4 GiB length with a 3-byte body: refused without allocating.
        assert!(matches!(
            read(&mut &b"\xff\xff\xff\xffabc"[..], 1 << 20).await,
            Err(ReadError::TooLarge { .. })
        ));
        // Truncated inside the payload, and inside the length: I/O errors, not a short frame.
        assert!(matches!(
            read(&mut &b"\x00\x00\x00\x09abc"[..], 100).await,
            Err(ReadError::Io(_))
        ));
        assert!(matches!(
            read(&mut &b"\x00\x00"[..], 100).await,
            Err(ReadError::Io(_))
        ));
        // Nothing at all: a clean end.
        assert!(matches!(
            read(&mut &b""[..], 100).await,
            Err(ReadError::Eof)
        ));
    }
}
