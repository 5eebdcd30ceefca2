//! `rpc-bench`: micromesh unary calls and streams against two baselines in one run: raw libp2p
//! request-response and a raw libp2p stream, on the same loopback TCP transport as micromesh's
//! nodes (TLS 1.3, or Noise when the peer lacks TLS, then yamux), and gRPC (tonic over cleartext
//! HTTP/2, one shared channel, a protobuf `bytes` body; see `grpc.rs`).
//!
//! Figures: latency p50/p99 at concurrency 1, calls/s and the process's CPU time per call with
//! 64 in flight, both with small (64 B) and 64 KiB payloads; stream throughput in MiB/s; and
//! from nothing to a first response: a new tonic channel, a new raw libp2p connection, a new
//! micromesh node calling a service by name. micromesh's figures are also taken over QUIC
//! (`micromesh_quic_against_tcp`, `micromesh_new_node_by_name_quic`). Latency samples interleave a baseline and
//! micromesh call by call, stream runs alternate them every half second, and throughput runs
//! once per round: all to even out a noisy machine. `taskset -c 0` pins the whole run to one
//! CPU.
//!
//! The two libp2p sides differ in how they use streams, and that is part of what is measured:
//! request-response opens and negotiates a stream per request, micromesh keeps the stream of a
//! unary call open for the caller's next call (`protocols/rpc.md`, "Reusing a stream"). A
//! second micromesh client with reuse off (`transport::Config::idle_timeout` zero) measures
//! the latency of calls that each open a stream, as a caller's first call to a peer does
//! (`new_stream_per_call`).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{AsyncReadExt as _, AsyncWriteExt as _, StreamExt as _};
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder, noise,
    request_response::{self, ProtocolSupport},
    swarm::{NetworkBehaviour, SwarmEvent},
    tcp, tls, yamux,
};
use micromesh::{Service, client::CallOptions, testing::wait_until};
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot};

use crate::grpc;
use crate::measure::{Call, Load, Options, load, paired_latencies, percentiles, quantile_ms};

const STREAM_PROTOCOL: StreamProtocol = StreamProtocol::new("/bench/stream/1.0.0");

#[derive(NetworkBehaviour)]
struct Raw {
    rr: request_response::cbor::Behaviour<ByteBuf, ByteBuf>,
    stream: libp2p_stream::Behaviour,
}

fn raw_swarm() -> Result<Swarm<Raw>, String> {
    let codec = request_response::cbor::codec::Codec::<ByteBuf, ByteBuf>::default()
        .set_request_size_maximum(8 << 20)
        .set_response_size_maximum(8 << 20);
    Ok(SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            (tls::Config::new, noise::Config::new),
            yamux::Config::default,
        )
        .map_err(|e| e.to_string())?
        .with_behaviour(|_| Raw {
            rr: request_response::Behaviour::with_codec(
                codec,
                [(
                    StreamProtocol::new("/bench/rr/1.0.0"),
                    ProtocolSupport::Full,
                )],
                request_response::Config::default()
                    .with_request_timeout(Duration::from_secs(60))
                    .with_max_concurrent_streams(1024),
            ),
            stream: libp2p_stream::Behaviour::new(),
        })
        .map_err(|e| e.to_string())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build())
}

type Request = (ByteBuf, oneshot::Sender<ByteBuf>);

/// A raw request-response pair: the server echoes; calls go through `calls`.
struct RawPair {
    calls: mpsc::Sender<Request>,
    control: libp2p_stream::Control,
    server: PeerId,
    addr: Multiaddr,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn raw_pair() -> Result<RawPair, String> {
    let mut server = raw_swarm()?;
    let mut sink = server
        .behaviour()
        .stream
        .new_control()
        .accept(STREAM_PROTOCOL)
        .map_err(|e| e.to_string())?;
    server
        .listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("valid"))
        .map_err(|e| e.to_string())?;
    let addr: Multiaddr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = server.select_next_some().await {
            break address;
        }
    };
    let server_id = *server.local_peer_id();
    let server_task = tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(RawEvent::Rr(request_response::Event::Message {
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            })) = server.select_next_some().await
            {
                let _ = server.behaviour_mut().rr.send_response(channel, request);
            }
        }
    });
    let sink_task = tokio::spawn(async move {
        while let Some((_, mut stream)) = sink.next().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
                let _ = stream.write_all(b"k").await;
                let _ = stream.close().await;
            });
        }
    });
    let mut client = raw_swarm()?;
    let control = client.behaviour().stream.new_control();
    client.dial(addr.clone()).map_err(|e| e.to_string())?;
    loop {
        if let SwarmEvent::ConnectionEstablished { .. } = client.select_next_some().await {
            break;
        }
    }
    let (calls, mut rx) = mpsc::channel::<Request>(1024);
    let client_task = tokio::spawn(async move {
        let mut pending = HashMap::new();
        loop {
            tokio::select! {
                call = rx.recv() => match call {
                    Some((body, reply)) => {
                        let id = client.behaviour_mut().rr.send_request(&server_id, body);
                        pending.insert(id, reply);
                    }
                    None => break,
                },
                event = client.select_next_some() => {
                    if let SwarmEvent::Behaviour(RawEvent::Rr(request_response::Event::Message {
                        message: request_response::Message::Response { request_id, response },
                        ..
                    })) = event
                        && let Some(reply) = pending.remove(&request_id)
                    {
                        let _ = reply.send(response);
                    }
                }
            }
        }
    });
    Ok(RawPair {
        calls,
        control,
        server: server_id,
        addr,
        _tasks: vec![server_task, sink_task, client_task],
    })
}

/// Latency percentiles at concurrency 1 of both sides, and micromesh's p50 and p99 over raw's.
fn latency_report(raw: &[Duration], micromesh: &[Duration]) -> serde_json::Value {
    serde_json::json!({
        "latency_c1": { "raw": percentiles(raw.to_vec()), "micromesh": percentiles(micromesh.to_vec()) },
        "latency_p50_ratio": quantile_ms(micromesh, 0.5) / quantile_ms(raw, 0.5),
        "latency_p99_ratio": quantile_ms(micromesh, 0.99) / quantile_ms(raw, 0.99),
    })
}

const TCP: &str = "/ip4/127.0.0.1/tcp/0";
const QUIC: &str = "/ip4/127.0.0.1/udp/0/quic-v1";

fn is_quic(addr: &Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::QuicV1))
}

/// A client node of the benchmark's network that joins through `bootstrap` and listens on the
/// same transport.
fn joining(name: impl Into<String>, bootstrap: &Multiaddr) -> micromesh::service::Builder {
    let listen = if is_quic(bootstrap) { QUIC } else { TCP };
    Service::builder(name)
        .network("bench")
        .register(false)
        .listen(listen.parse().expect("valid"))
        .bootstrap(bootstrap.clone())
        .configure_node(|n| n.mdns(false).upnp(false).autonat(false).memory_limit(None))
}

/// How long each load run (64 calls in flight) lasts.
const LOAD_RUN: Duration = Duration::from_secs(3);
/// How many fresh clients of each kind the first-response figure starts, at the least.
const FIRST_RESPONSES: usize = 30;

/// One side of a comparison: its name, its latencies at concurrency 1 and its load runs.
type Side<'a> = (&'a str, &'a [Duration], &'a [Load]);

/// Side `a` against side `b` (whose latencies were sampled in pairs): both sides' figures, and
/// `a`'s over `b`'s as ratios.
fn against(
    (a, a_latency, a_load): Side<'_>,
    (b, b_latency, b_load): Side<'_>,
) -> serde_json::Value {
    let (a_mean, b_mean) = (Load::mean(a_load), Load::mean(b_load));
    let calls_per_second =
        |loads: &[Load]| loads.iter().map(|l| l.calls_per_second).collect::<Vec<_>>();
    serde_json::json!({
        "latency_c1": { a: percentiles(a_latency.to_vec()), b: percentiles(b_latency.to_vec()) },
        "calls_per_second_64_in_flight": { a: calls_per_second(a_load), b: calls_per_second(b_load) },
        "cpu_us_per_call_64_in_flight": { a: a_mean.cpu_us_per_call, b: b_mean.cpu_us_per_call },
        "latency_p50_ratio": quantile_ms(a_latency, 0.5) / quantile_ms(b_latency, 0.5),
        "latency_p99_ratio": quantile_ms(a_latency, 0.99) / quantile_ms(b_latency, 0.99),
        "throughput_ratio": a_mean.calls_per_second / b_mean.calls_per_second,
        "cpu_per_call_ratio": a_mean.cpu_us_per_call / b_mean.cpu_us_per_call,
    })
}

/// From nothing to the first response, `n` times for each side in turn (so load from elsewhere
/// on the machine falls on all three): a new tonic channel and one call; a new raw libp2p swarm,
/// its connection and one request; a new micromesh node that knows the server's address as its
/// bootstrap peer, and one call of the service by name (the name resolved through the mesh),
/// over TCP and over QUIC.
async fn first_responses(
    raw: &RawPair,
    grpc_addr: std::net::SocketAddr,
    [tcp, quic]: [&Multiaddr; 2],
    n: usize,
) -> Result<serde_json::Value, String> {
    let (mut grpc_first, mut raw_first) = (Vec::new(), Vec::new());
    let (mut tcp_first, mut quic_first) = (Vec::new(), Vec::new());
    let payload = vec![0x5au8; 64];
    for i in 0..n {
        let started = Instant::now();
        grpc::Client::connect(grpc_addr)
            .await?
            .echo(payload.clone())
            .await?;
        grpc_first.push(started.elapsed());

        let started = Instant::now();
        raw_first_response(raw, ByteBuf::from(payload.clone())).await?;
        raw_first.push(started.elapsed());

        for (bootstrap, samples) in [(tcp, &mut tcp_first), (quic, &mut quic_first)] {
            let started = Instant::now();
            let fresh = joining(format!("bench-first-{i}"), bootstrap)
                .build()
                .await
                .map_err(|e| e.to_string())?;
            let reply: ByteBuf = fresh
                .client()
                .call("bench", "Bench.Echo", &ByteBuf::from(payload.clone()))
                .await
                .map_err(|e| format!("first call of fresh node {i}: {e}"))?;
            samples.push(started.elapsed());
            if reply.len() != payload.len() {
                return Err("the first call's echo differs".into());
            }
            fresh.stop().await.map_err(|e| e.to_string())?;
        }
    }
    Ok(serde_json::json!({
        "grpc_new_channel": percentiles(grpc_first.clone()),
        "raw_new_connection": percentiles(raw_first.clone()),
        "micromesh_new_node_by_name": percentiles(tcp_first.clone()),
        "micromesh_new_node_by_name_quic": percentiles(quic_first.clone()),
        "micromesh_over_grpc_p50": quantile_ms(&tcp_first, 0.5) / quantile_ms(&grpc_first, 0.5),
        "micromesh_over_raw_p50": quantile_ms(&tcp_first, 0.5) / quantile_ms(&raw_first, 0.5),
        "quic_over_tcp_p50": quantile_ms(&quic_first, 0.5) / quantile_ms(&tcp_first, 0.5),
    }))
}

/// A new raw libp2p swarm dials the raw server and sends one request; returns once the
/// response is in.
async fn raw_first_response(raw: &RawPair, body: ByteBuf) -> Result<(), String> {
    let mut swarm = raw_swarm()?;
    swarm.dial(raw.addr.clone()).map_err(|e| e.to_string())?;
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    loop {
        let event = tokio::select! {
            event = swarm.select_next_some() => event,
            () = &mut deadline => return Err("raw first response: no response within 10 s".into()),
        };
        match event {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == raw.server => {
                swarm
                    .behaviour_mut()
                    .rr
                    .send_request(&peer_id, body.clone());
            }
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                return Err(format!("raw first response: {error}"));
            }
            SwarmEvent::Behaviour(RawEvent::Rr(request_response::Event::Message {
                message: request_response::Message::Response { .. },
                ..
            })) => return Ok(()),
            SwarmEvent::Behaviour(RawEvent::Rr(request_response::Event::OutboundFailure {
                error,
                ..
            })) => return Err(format!("raw first response: {error}")),
            _ => {}
        }
    }
}

/// How many segments the stream measurement of a round is cut into, and how long each is.
const STREAM_SEGMENTS: usize = 6;
const STREAM_SEGMENT: Duration = Duration::from_millis(500);

/// Writes `chunk` on a raw libp2p stream for one segment, then closes it and waits for the
/// sink's acknowledgement. Returns the bytes sent.
async fn raw_stream(raw: &RawPair, chunk: &[u8]) -> Result<u64, String> {
    let mut control = raw.control.clone();
    let mut stream = control
        .open_stream(raw.server, STREAM_PROTOCOL)
        .await
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < STREAM_SEGMENT {
        stream.write_all(chunk).await.map_err(|e| e.to_string())?;
        sent += chunk.len() as u64;
    }
    stream.close().await.map_err(|e| e.to_string())?;
    let mut ack = [0u8; 1];
    stream
        .read_exact(&mut ack)
        .await
        .map_err(|e| e.to_string())?;
    Ok(sent)
}

/// Sends `chunk` as messages of a micromesh client-streaming call for one segment, then ends
/// the call and checks the server counted every byte. Returns the bytes sent.
async fn client_stream(client: &Service, chunk: &[u8]) -> Result<u64, String> {
    let options = CallOptions::default().timeout(Duration::from_secs(60));
    let mut call = client
        .client()
        .client_stream::<ByteBuf, u64>("bench", "Bench.Sink", options)
        .await
        .map_err(|e| e.to_string())?;
    let body = ByteBuf::from(chunk.to_vec());
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < STREAM_SEGMENT {
        call.send(&body).await.map_err(|e| e.to_string())?;
        sent += chunk.len() as u64;
    }
    let received = call.finish().await.map_err(|e| e.to_string())?;
    if received != sent {
        return Err(format!(
            "the stream lost data: sent {sent}, received {received}"
        ));
    }
    Ok(sent)
}

pub(crate) async fn run(options: &Options) -> Result<serde_json::Value, String> {
    let rounds = options.rounds.clamp(1, 4);
    let raw = raw_pair().await?;

    let server = Service::builder("bench")
        .network("bench")
        .listen(TCP.parse().expect("valid"))
        .listen(QUIC.parse().expect("valid"))
        .configure_node(|n| n.mdns(false).upnp(false).autonat(false).memory_limit(None))
        .handle("Bench.Echo", crate::measure::echo)
        .client_stream("Bench.Sink", crate::measure::count_bytes)
        .build()
        .await
        .map_err(|e| e.to_string())?;
    let listening = server
        .node()
        .listen_addrs()
        .await
        .map_err(|e| e.to_string())?;
    let on = |quic: bool| {
        listening
            .iter()
            .find(|a| is_quic(a) == quic)
            .cloned()
            .ok_or_else(|| {
                format!(
                    "the server does not listen on {}",
                    if quic { QUIC } else { TCP }
                )
            })
    };
    let (addr, quic_addr) = (on(false)?, on(true)?);
    let client_of = |name: &str, transport: micromesh::transport::Config, bootstrap: &Multiaddr| {
        joining(name, bootstrap).transport_config(transport).build()
    };
    let client = client_of("bench-client", Default::default(), &addr)
        .await
        .map_err(|e| e.to_string())?;
    // The same, with stream reuse off: every call opens and negotiates a stream, as
    // request-response does.
    let fresh = client_of(
        "bench-client-fresh",
        micromesh::transport::Config::default().idle_timeout(Duration::ZERO),
        &addr,
    )
    .await
    .map_err(|e| e.to_string())?;
    // The same calls over QUIC.
    let quic = client_of("bench-client-quic", Default::default(), &quic_addr)
        .await
        .map_err(|e| e.to_string())?;
    for service in [&client, &fresh, &quic] {
        let registry = service.registry().clone();
        wait_until(Duration::from_secs(20), || async {
            registry.get_service("bench").await.is_ok()
        })
        .await
        .map_err(|e| e.to_string())?;
    }
    for (service, over_quic) in [(&client, false), (&quic, true)] {
        let peers = service.node().peers().await.map_err(|e| e.to_string())?;
        let to_server = peers.iter().find(|p| p.peer_id == server.peer_id());
        if !to_server.is_some_and(|p| p.addresses.iter().all(|a| is_quic(a) == over_quic)) {
            return Err(format!(
                "{} is not connected over the transport it measures",
                service.name()
            ));
        }
    }

    let grpc_addr = grpc::serve().await?;
    let grpc_client = grpc::Client::connect(grpc_addr).await?;

    let mut report = serde_json::Map::new();
    for (label, size) in [("small", 64usize), ("64KiB", 64 * 1024)] {
        let payload = ByteBuf::from(vec![0x5au8; size]);
        let raw_call: Call = {
            let calls = raw.calls.clone();
            let payload = payload.clone();
            Arc::new(move || {
                let calls = calls.clone();
                let payload = payload.clone();
                Box::pin(async move {
                    let (tx, rx) = oneshot::channel();
                    calls.send((payload, tx)).await.expect("raw client runs");
                    rx.await.expect("raw response");
                })
            })
        };
        let grpc_call: Call = {
            let client = grpc_client.clone();
            let payload = payload.to_vec();
            Arc::new(move || {
                let mut client = client.clone();
                let payload = payload.clone();
                Box::pin(async move {
                    if let Err(e) = client.echo(payload).await {
                        panic!("{e}");
                    }
                })
            })
        };
        let echo = |service: &Service| -> Call {
            let c = service.client().clone();
            let payload = payload.clone();
            Arc::new(move || {
                let c = c.clone();
                let payload = payload.clone();
                Box::pin(async move {
                    let options = CallOptions::default().timeout(Duration::from_secs(60));
                    let reply: Result<ByteBuf, _> =
                        c.call_with("bench", "Bench.Echo", &payload, options).await;
                    if let Err(e) = reply {
                        panic!("micromesh call of {} bytes failed: {e:?}", payload.len());
                    }
                })
            })
        };
        let (mm_call, fresh_call, quic_call) = (echo(&client), echo(&fresh), echo(&quic));
        // Warm up every path.
        eprintln!("{label}: warm-up");
        paired_latencies(&raw_call, &mm_call, 200).await;
        paired_latencies(&raw_call, &fresh_call, 200).await;
        paired_latencies(&grpc_call, &mm_call, 200).await;
        paired_latencies(&mm_call, &quic_call, 200).await;
        let (mut raw_lat, mut mm_lat, mut grpc_lat, mut mm_lat_vs_grpc) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut raw_lat_fresh, mut fresh_lat) = (Vec::new(), Vec::new());
        let (mut raw_load, mut mm_load, mut grpc_load) = (Vec::new(), Vec::new(), Vec::new());
        let (mut tcp_lat, mut quic_lat, mut quic_load) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let (raw, mm) = paired_latencies(&raw_call, &mm_call, 1000).await;
            raw_lat.extend(raw);
            mm_lat.extend(mm);
            let (grpc, mm) = paired_latencies(&grpc_call, &mm_call, 1000).await;
            grpc_lat.extend(grpc);
            mm_lat_vs_grpc.extend(mm);
            let (raw, mm) = paired_latencies(&raw_call, &fresh_call, 1000).await;
            raw_lat_fresh.extend(raw);
            fresh_lat.extend(mm);
            let (tcp, over_quic) = paired_latencies(&mm_call, &quic_call, 1000).await;
            tcp_lat.extend(tcp);
            quic_lat.extend(over_quic);
            eprintln!("{label}: throughput");
            raw_load.push(load(&raw_call, 64, LOAD_RUN).await);
            grpc_load.push(load(&grpc_call, 64, LOAD_RUN).await);
            mm_load.push(load(&mm_call, 64, LOAD_RUN).await);
            quic_load.push(load(&quic_call, 64, LOAD_RUN).await);
        }
        report.insert(label.into(), {
            let mut figures = latency_report(&raw_lat, &mm_lat);
            figures["payload_bytes"] = size.into();
            figures["calls_per_second_64_in_flight"] = serde_json::json!({
                "raw": raw_load.iter().map(|l| l.calls_per_second).collect::<Vec<_>>(),
                "micromesh": mm_load.iter().map(|l| l.calls_per_second).collect::<Vec<_>>(),
            });
            figures["throughput_ratio"] = (Load::mean(&mm_load).calls_per_second
                / Load::mean(&raw_load).calls_per_second)
                .into();
            figures["new_stream_per_call"] = latency_report(&raw_lat_fresh, &fresh_lat);
            figures["against_grpc"] = against(
                ("micromesh", &mm_lat_vs_grpc, &mm_load),
                ("grpc", &grpc_lat, &grpc_load),
            );
            figures["micromesh_quic_against_tcp"] =
                against(("quic", &quic_lat, &quic_load), ("tcp", &tcp_lat, &mm_load));
            figures
        });
    }

    report.insert(
        "first_response".into(),
        first_responses(
            &raw,
            grpc_addr,
            [&addr, &quic_addr],
            FIRST_RESPONSES.max(rounds * 10),
        )
        .await?,
    );

    // Streams: 64 KiB messages, 3 s per side and round, in six half-second segments that
    // alternate the sides (raw first, then micromesh first): a burst of load from elsewhere
    // on the machine falls on both.
    let chunk = vec![0x33u8; 64 * 1024];
    let (mut raw_mib, mut mm_mib) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (mut raw_sent, mut raw_time, mut mm_sent, mut mm_time) =
            (0u64, Duration::ZERO, 0u64, Duration::ZERO);
        for segment in 0..STREAM_SEGMENTS {
            for micromesh in [segment % 2 == 1, segment % 2 == 0] {
                let started = Instant::now();
                if micromesh {
                    mm_sent += client_stream(&client, &chunk).await?;
                    mm_time += started.elapsed();
                } else {
                    raw_sent += raw_stream(&raw, &chunk).await?;
                    raw_time += started.elapsed();
                }
            }
        }
        let mib_per_second =
            |sent: u64, time: Duration| sent as f64 / (1 << 20) as f64 / time.as_secs_f64();
        raw_mib.push(mib_per_second(raw_sent, raw_time));
        mm_mib.push(mib_per_second(mm_sent, mm_time));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    report.insert(
        "stream_64KiB_messages".into(),
        serde_json::json!({
            "mib_per_second": { "raw": raw_mib, "micromesh": mm_mib },
            "throughput_ratio": mean(&mm_mib) / mean(&raw_mib),
        }),
    );
    for service in [client, fresh, quic, server] {
        service.stop().await.map_err(|e| e.to_string())?;
    }
    report.insert("scenario".into(), "rpc-bench".into());
    report.insert(
        "transport".into(),
        "TCP loopback; micromesh and raw libp2p: TLS 1.3 (Noise as fallback), yamux (raw side: libp2p request-response cbor and libp2p-stream); gRPC: tonic, cleartext HTTP/2"
            .into(),
    );
    Ok(serde_json::Value::Object(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_comparison_names_both_sides_and_divides_the_first_by_the_second() {
        let ms = Duration::from_millis;
        let load = |calls_per_second, cpu_us_per_call| Load {
            calls_per_second,
            cpu_us_per_call,
        };
        let figures = against(
            (
                "quic",
                &[ms(2), ms(2), ms(4)],
                &[load(50.0, 30.0), load(150.0, 10.0)],
            ),
            ("tcp", &[ms(1), ms(1), ms(2)], &[load(200.0, 10.0)]),
        );
        assert_eq!(figures["latency_c1"]["quic"]["p50_ms"], 2.0);
        assert_eq!(figures["latency_c1"]["tcp"]["p50_ms"], 1.0);
        assert_eq!(figures["cpu_us_per_call_64_in_flight"]["quic"], 20.0);
        assert_eq!(figures["latency_p50_ratio"], 2.0);
        assert_eq!(figures["throughput_ratio"], 0.5);
        assert_eq!(figures["cpu_per_call_ratio"], 2.0);
    }
}
