//! Calls over real loopback sockets, TCP (yamux) and QUIC: round trips, and many concurrent
//! streams in both directions at once (rust-libp2p #5410 reported a yamux deadlock there),
//! with unary calls on kept streams going both ways meanwhile.

use std::time::Duration;

use futures::StreamExt as _;
use micromesh::{
    Context, Multiaddr, Service, Status, client::CallOptions, server::Streaming,
    testing::wait_until,
};

const CHUNK: usize = 16 * 1024;
const MESSAGES: usize = 200;
const STREAMS: usize = 8;
const CALLS: usize = 100;

async fn echo(
    _: Context,
    chunks: Streaming<serde_bytes::ByteBuf>,
) -> Result<futures::stream::BoxStream<'static, Result<serde_bytes::ByteBuf, Status>>, Status> {
    Ok(chunks.boxed())
}

async fn peer(name: &str, listen: &str, bootstrap: Option<Multiaddr>) -> Service {
    let mut builder = Service::builder(name)
        .network("loopback")
        .listen(listen.parse().unwrap())
        .configure_node(|n| n.mdns(false).upnp(false).autonat(false).memory_limit(None))
        .bidi_stream("Echo.Chunks", echo)
        .handle("Echo.Hello", |ctx: Context, name: String| async move {
            Ok::<_, Status>(format!("hello {name} from {}", ctx.service()))
        });
    if let Some(addr) = bootstrap {
        builder = builder.bootstrap(addr);
    }
    builder.build().await.unwrap()
}

/// Streams `MESSAGES` chunks of 16 KiB through `target`'s echo and checks them all came back.
async fn pump(from: Service, target: &'static str, stream_no: usize) {
    let options = CallOptions::default().timeout(Duration::from_secs(60));
    let mut call = from
        .client()
        .stream::<serde_bytes::ByteBuf, serde_bytes::ByteBuf>(target, "Echo.Chunks", options)
        .await
        .unwrap();
    let mut received = 0;
    for i in 0..MESSAGES {
        let chunk = vec![(i + stream_no) as u8; CHUNK];
        call.send(&serde_bytes::ByteBuf::from(chunk)).await.unwrap();
        // Keep a window of messages in flight in both directions.
        if i >= 4 {
            let back = call.recv().await.unwrap().unwrap();
            assert_eq!(back[0], (received + stream_no) as u8);
            received += 1;
        }
    }
    call.close_send().await.unwrap();
    while let Some(back) = call.recv().await {
        assert_eq!(back.unwrap()[0], (received + stream_no) as u8);
        received += 1;
    }
    assert_eq!(received, MESSAGES);
}

/// Makes `CALLS` unary calls one after another to `target` (on streams kept between calls),
/// checking every reply.
async fn greet(from: Service, target: &'static str, task: usize) {
    for i in 0..CALLS {
        let name = format!("{task}-{i}");
        let hello: String = from
            .client()
            .call(target, "Echo.Hello", &name)
            .await
            .unwrap();
        assert_eq!(hello, format!("hello {name} from {target}"));
    }
}

async fn both_directions(listen: &str) {
    let a = peer("alpha", listen, None).await;
    let a_addr = a.node().listen_addrs().await.unwrap().remove(0);
    let b = peer("beta", listen, Some(a_addr)).await;
    for (s, target) in [(&a, "beta"), (&b, "alpha")] {
        let registry = s.registry().clone();
        wait_until(Duration::from_secs(20), || async {
            registry.get_service(target).await.is_ok()
        })
        .await
        .unwrap();
    }
    let hello: String = a
        .client()
        .call("beta", "Echo.Hello", &"alpha")
        .await
        .unwrap();
    assert_eq!(hello, "hello alpha from beta");

    let mut tasks = Vec::new();
    for i in 0..STREAMS {
        tasks.push(tokio::spawn(pump(a.clone(), "beta", i)));
        tasks.push(tokio::spawn(pump(b.clone(), "alpha", i)));
        // Unary calls meanwhile, in both directions.
        tasks.push(tokio::spawn(greet(a.clone(), "beta", i)));
        tasks.push(tokio::spawn(greet(b.clone(), "alpha", i)));
    }
    let all = futures::future::join_all(tasks);
    let results = tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .expect("concurrent streams in both directions hung");
    for r in results {
        r.unwrap();
    }
    // Every stream b served: one per streaming call, and no more unary ones than calls ran
    // at once (the first call's included), not one per call.
    let streams = micromesh::testing::metric(b.node(), "micromesh_server_streams_total");
    assert!(streams >= 1, "the server counted no stream");
    assert!(streams <= 2 * STREAMS as u64 + 1, "{streams} streams");
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_both_ways_over_tcp_yamux() {
    both_directions("/ip4/127.0.0.1/tcp/0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_both_ways_over_quic() {
    both_directions("/ip4/127.0.0.1/udp/0/quic-v1").await;
}
