//! `pubsub-bench`: publish-to-deliver latency and delivery ratio of the micromesh broker against
//! raw gossipsub, on N in-process nodes (memory transport, Noise, yamux), in one run.
//!
//! Four series:
//!
//! - **raw gossipsub**: gossipsub alone on a bare libp2p swarm (the baseline the issue names);
//! - **libp2p stack**: the same bare swarm with the libp2p behaviours a micromesh node composes
//!   beside gossipsub, configured as micromesh configures them (identify, ping every 10 s,
//!   Kademlia, libp2p-stream accepting micromesh's four stream protocols, relay client, DCUtR),
//!   and no micromesh code at all: what the stack costs by itself;
//! - **micromesh node gossip**: the node's own gossip (`Node::publish`, `Node::subscribe`), i.e.
//!   the stack plus micromesh's event loop, keep-alive, limits and subscriber queues;
//! - **micromesh broker**: the broker on top (envelopes, validation, ordering, handlers).
//!
//! Every mesh gets the same shape: every node connected to every other, every node but the
//! publisher subscribed, gossipsub's heartbeat at 500 ms, and every message signed by its
//! publisher. The bare swarms sign with gossipsub's strict mode, which checks the signature of
//! every copy a node receives; micromesh signs a frame of its own, which each node checks once
//! per message (`protocols/README.md`, "Gossip frames"). One node publishes
//! `MESSAGES` small messages at a steady rate (`--rate`, default 20 per second); each subscriber
//! notes when each arrives. Rounds alternate the series to even out a noisy machine (`--rounds`,
//! default 5, at most 10). Each ratio between two series is reported twice: over the latencies
//! of all rounds pooled, and as the median of the ratios of round 1 to round 1, round 2 to
//! round 2, and so on. The second is the steadier figure: one slow spell of the machine moves
//! one round's ratio, not the median.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder,
    core::{Transport as _, transport::MemoryTransport, upgrade::Version},
    dcutr, gossipsub, identify, kad, noise, ping, relay,
    swarm::{NetworkBehaviour, SwarmEvent},
    yamux,
};
use micromesh::{
    Status,
    broker::Event,
    testing::{Cluster, wait_until},
};
use tokio::sync::mpsc;

use crate::measure::{Options, cpu_time, percentiles, quantile_ms};

const TOPIC: &str = "bench";
/// The most rounds of each series one run takes (each round of the four series takes about
/// 100 s).
const MAX_ROUNDS: usize = 10;
const MESSAGES: u64 = 200;
/// How long a mesh settles before the measurement, and the last part of that in which its idle
/// CPU use is measured.
const SETTLE: Duration = Duration::from_secs(10);
const IDLE_WINDOW: Duration = Duration::from_secs(3);
/// How long deliveries may take after the last publish.
const DRAIN: Duration = Duration::from_secs(3);

/// When each (message, subscriber) arrived, and when each message was published.
#[derive(Default)]
struct Log {
    sent: HashMap<u64, Instant>,
    received: Vec<(u64, Instant)>,
}

type SharedLog = Arc<Mutex<Log>>;

/// What one round measured.
struct Round {
    latencies: Vec<Duration>,
    delivery_ratio: f64,
    /// CPU used per second while the mesh was idle, in percent of one core.
    idle_cpu_percent: f64,
    /// CPU used while publishing and delivering, per message, in milliseconds.
    cpu_ms_per_message: f64,
}

fn round(log: &Log, subscribers: usize, idle: f64, busy: Duration) -> Round {
    let latencies: Vec<Duration> = log
        .received
        .iter()
        .filter_map(|(n, at)| {
            log.sent
                .get(n)
                .map(|sent| at.saturating_duration_since(*sent))
        })
        .collect();
    Round {
        latencies,
        delivery_ratio: log.received.len() as f64 / (MESSAGES as f64 * subscribers as f64),
        idle_cpu_percent: idle,
        cpu_ms_per_message: busy.as_secs_f64() * 1000.0 / MESSAGES as f64,
    }
}

/// Waits for the mesh to settle; returns the CPU it used in the last seconds of the wait, in
/// percent of one core.
async fn settle() -> f64 {
    tokio::time::sleep(SETTLE - IDLE_WINDOW).await;
    let before = cpu_time();
    tokio::time::sleep(IDLE_WINDOW).await;
    cpu_time().saturating_sub(before).as_secs_f64() * 100.0 / IDLE_WINDOW.as_secs_f64()
}

/// A bare swarm's behaviour: gossipsub, alone or with other behaviours beside it.
trait Gossip: NetworkBehaviour + Send + 'static
where
    Self::ToSwarm: Send,
{
    fn gossipsub(&mut self) -> &mut gossipsub::Behaviour;
    /// The gossipsub message in one of the behaviour's events.
    fn message(event: Self::ToSwarm) -> Option<gossipsub::Message>;
}

impl Gossip for gossipsub::Behaviour {
    fn gossipsub(&mut self) -> &mut gossipsub::Behaviour {
        self
    }

    fn message(event: gossipsub::Event) -> Option<gossipsub::Message> {
        match event {
            gossipsub::Event::Message { message, .. } => Some(message),
            _ => None,
        }
    }
}

/// Gossipsub with the libp2p behaviours a micromesh node runs beside it.
#[derive(NetworkBehaviour)]
struct Stack {
    gossipsub: gossipsub::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    streams: libp2p_stream::Behaviour,
    relay_client: relay::client::Behaviour,
    dcutr: dcutr::Behaviour,
}

impl Gossip for Stack {
    fn gossipsub(&mut self) -> &mut gossipsub::Behaviour {
        &mut self.gossipsub
    }

    fn message(event: StackEvent) -> Option<gossipsub::Message> {
        match event {
            StackEvent::Gossipsub(event) => gossipsub::Behaviour::message(event),
            _ => None,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn gossipsub_behaviour(key: &libp2p::identity::Keypair) -> Result<gossipsub::Behaviour, BoxError> {
    let config = gossipsub::ConfigBuilder::default()
        .heartbeat_interval(Duration::from_millis(500))
        .validation_mode(gossipsub::ValidationMode::Strict)
        .build()?;
    Ok(gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        config,
    )?)
}

/// The behaviours beside gossipsub, with micromesh's settings where it changes libp2p's. The
/// stream protocols stay supported as long as `incoming` holds their (never read) receivers.
fn stack(
    key: &libp2p::identity::Keypair,
    relay_client: relay::client::Behaviour,
    incoming: &mut Vec<libp2p_stream::IncomingStreams>,
) -> Result<Stack, BoxError> {
    let peer = PeerId::from(key.public());
    let network = "pubsub-bench";
    let protocol =
        |name: &str| StreamProtocol::try_from_owned(format!("/micromesh/{network}/{name}/1.0.0"));
    let streams = libp2p_stream::Behaviour::new();
    let mut control = streams.new_control();
    for name in ["rpc", "registry", "broker", "auth"] {
        incoming.push(control.accept(protocol(name)?)?);
    }
    let kad_config = kad::Config::new(protocol("kad")?);
    Ok(Stack {
        gossipsub: gossipsub_behaviour(key)?,
        identify: identify::Behaviour::new(
            identify::Config::new("/micromesh/1.0.0".into(), key.public())
                .with_push_listen_addr_updates(true)
                .with_interval(Duration::from_secs(300)),
        ),
        ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(10))),
        kad: kad::Behaviour::with_config(peer, kad::store::MemoryStore::new(peer), kad_config),
        streams,
        relay_client,
        dcutr: dcutr::Behaviour::new(peer),
    })
}

fn memory_transport(
    key: &libp2p::identity::Keypair,
) -> Result<libp2p::core::transport::Boxed<(PeerId, libp2p::core::muxing::StreamMuxerBox)>, BoxError>
{
    Ok(MemoryTransport::default()
        .upgrade(Version::V1)
        .authenticate(noise::Config::new(key)?)
        .multiplex(yamux::Config::default())
        .map(|(peer, muxer), _| (peer, libp2p::core::muxing::StreamMuxerBox::new(muxer)))
        .boxed())
}

fn idle_timeout(c: libp2p::swarm::Config) -> libp2p::swarm::Config {
    c.with_idle_connection_timeout(Duration::from_secs(300))
}

fn gossipsub_swarm() -> Result<Swarm<gossipsub::Behaviour>, String> {
    Ok(SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_other_transport(memory_transport)
        .map_err(|e| e.to_string())?
        .with_behaviour(gossipsub_behaviour)
        .map_err(|e| e.to_string())?
        .with_swarm_config(idle_timeout)
        .build())
}

fn stack_swarm(incoming: &mut Vec<libp2p_stream::IncomingStreams>) -> Result<Swarm<Stack>, String> {
    Ok(SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_other_transport(memory_transport)
        .map_err(|e| e.to_string())?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| e.to_string())?
        .with_behaviour(|key, relay_client| stack(key, relay_client, incoming))
        .map_err(|e| e.to_string())?
        .with_swarm_config(idle_timeout)
        .build())
}

/// `nodes` bare swarms from `build`.
fn swarms<B: NetworkBehaviour>(
    nodes: usize,
    build: impl FnMut() -> Result<Swarm<B>, String>,
) -> Result<Vec<Swarm<B>>, String> {
    std::iter::repeat_with(build).take(nodes).collect()
}

/// Gossipsub on bare swarms: swarm 0 publishes, the others subscribe.
async fn bare_round<B>(built: Vec<Swarm<B>>, interval: Duration) -> Result<Round, String>
where
    B: Gossip,
    B::ToSwarm: Send,
{
    let nodes = built.len();
    let topic = gossipsub::IdentTopic::new(TOPIC);
    let mut swarms = Vec::new();
    let mut addrs: Vec<Multiaddr> = Vec::new();
    for mut swarm in built {
        swarm
            .listen_on("/memory/0".parse().expect("valid"))
            .map_err(|e| e.to_string())?;
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                break address;
            }
        };
        for earlier in &addrs {
            swarm.dial(earlier.clone()).map_err(|e| e.to_string())?;
        }
        addrs.push(addr);
        swarms.push(swarm);
    }
    let log: SharedLog = Arc::default();
    let (publish_tx, publish_rx) = mpsc::channel::<Vec<u8>>(16);
    let mut publish_rx = Some(publish_rx);
    let (ready_tx, mut ready_rx) = mpsc::channel::<usize>(1);
    let mut tasks = Vec::new();
    for (i, mut swarm) in swarms.into_iter().enumerate() {
        let log = log.clone();
        let topic = topic.clone();
        if let (0, Some(mut publish_rx)) = (i, publish_rx.take()) {
            let ready = ready_tx.clone();
            let expected = nodes - 1;
            tasks.push(tokio::spawn(async move {
                let mut reported = false;
                let mut check = tokio::time::interval(Duration::from_millis(50));
                loop {
                    tokio::select! {
                        data = publish_rx.recv() => match data {
                            Some(data) => {
                                if let Err(e) = swarm.behaviour_mut().gossipsub().publish(topic.clone(), data) {
                                    eprintln!("bare publish failed: {e}");
                                }
                            }
                            None => break,
                        },
                        _ = swarm.select_next_some() => {}
                        _ = check.tick(), if !reported => {
                            let known = swarm
                                .behaviour_mut()
                                .gossipsub()
                                .all_peers()
                                .filter(|(_, topics)| topics.iter().any(|t| **t == topic.hash()))
                                .count();
                            if known >= expected {
                                reported = true;
                                let _ = ready.send(known).await;
                            }
                        }
                    }
                }
            }));
        } else {
            swarm
                .behaviour_mut()
                .gossipsub()
                .subscribe(&topic)
                .map_err(|e| e.to_string())?;
            tasks.push(tokio::spawn(async move {
                loop {
                    if let SwarmEvent::Behaviour(event) = swarm.select_next_some().await
                        && let Some(message) = B::message(event)
                        && let Ok(bytes) = <[u8; 8]>::try_from(message.data.as_slice())
                    {
                        let at = Instant::now();
                        log.lock()
                            .expect("not poisoned")
                            .received
                            .push((u64::from_be_bytes(bytes), at));
                    }
                }
            }));
        }
    }
    tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
        .await
        .map_err(|_| "bare swarms: subscribers not known in time".to_owned())?;
    // Let the mesh form, as in the micromesh round.
    let idle = settle().await;
    let cpu_before = cpu_time();
    let mut pace = tokio::time::interval(interval);
    for n in 0..MESSAGES {
        pace.tick().await;
        log.lock()
            .expect("not poisoned")
            .sent
            .insert(n, Instant::now());
        publish_tx
            .send(n.to_be_bytes().to_vec())
            .await
            .map_err(|_| "bare publisher stopped")?;
    }
    tokio::time::sleep(DRAIN).await;
    let busy = cpu_time().saturating_sub(cpu_before);
    for task in tasks {
        task.abort();
    }
    let log = log.lock().expect("not poisoned");
    Ok(round(&log, nodes - 1, idle, busy))
}

/// What a micromesh round publishes and subscribes through.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Layer {
    /// The node's raw gossip (`Node::publish`, `Node::subscribe`): micromesh's libp2p stack.
    Node,
    /// The broker on top: envelopes, validation, ordering, handlers.
    Broker,
}

/// A micromesh cluster of `nodes`: member 0 publishes, the others subscribe.
async fn micromesh_round(nodes: usize, interval: Duration, layer: Layer) -> Result<Round, String> {
    let cluster = Cluster::builder()
        .size(nodes)
        .network("pubsub-bench")
        .build()
        .await
        .map_err(|e| e.to_string())?;
    // The same shape as the baseline: everyone connected to everyone.
    let mut addrs = Vec::new();
    for i in 0..nodes {
        addrs.push(
            cluster
                .node(i)
                .listen_addrs()
                .await
                .map_err(|e| e.to_string())?
                .remove(0),
        );
    }
    for i in 0..nodes {
        let node = cluster.node(i).clone();
        let dials = addrs[..i].iter().map(|a| node.dial(a.clone()));
        for result in futures::future::join_all(dials).await {
            result.map_err(|e| e.to_string())?;
        }
    }
    let log: SharedLog = Arc::default();
    let mut subscriptions = Vec::new();
    let mut readers = Vec::new();
    for i in 1..nodes {
        let log = log.clone();
        if layer == Layer::Node {
            let mut sub = cluster
                .node(i)
                .subscribe(TOPIC)
                .await
                .map_err(|e| e.to_string())?;
            readers.push(tokio::spawn(async move {
                while let Some(message) = sub.recv().await {
                    let at = Instant::now();
                    if let Ok(bytes) = <[u8; 8]>::try_from(message.data.as_slice()) {
                        log.lock()
                            .expect("not poisoned")
                            .received
                            .push((u64::from_be_bytes(bytes), at));
                    }
                }
            }));
            continue;
        }
        let sub = cluster
            .service(i)
            .broker()
            .subscribe(TOPIC, move |event: Event<u64>| {
                let at = Instant::now();
                let log = log.clone();
                async move {
                    log.lock()
                        .expect("not poisoned")
                        .received
                        .push((event.body, at));
                    Ok::<_, Status>(())
                }
            })
            .await
            .map_err(|e| e.to_string())?;
        subscriptions.push(sub);
    }
    let publisher = cluster.service(0).clone();
    let node = publisher.node().clone();
    wait_until(Duration::from_secs(60), || async {
        node.topic_peers(TOPIC).await.map_or(0, |p| p.len()) >= nodes - 1
    })
    .await
    .map_err(|_| "micromesh: subscribers not known in time".to_owned())?;
    let idle = settle().await;
    let cpu_before = cpu_time();
    let broker = publisher.broker().clone();
    let mut pace = tokio::time::interval(interval);
    for n in 0..MESSAGES {
        pace.tick().await;
        log.lock()
            .expect("not poisoned")
            .sent
            .insert(n, Instant::now());
        match layer {
            Layer::Node => {
                node.publish(TOPIC, n.to_be_bytes().to_vec())
                    .await
                    .map_err(|e| format!("publish: {e}"))?;
            }
            Layer::Broker => {
                broker
                    .publish(TOPIC, &n)
                    .await
                    .map_err(|e| format!("publish: {e}"))?;
            }
        }
    }
    tokio::time::sleep(DRAIN).await;
    let busy = cpu_time().saturating_sub(cpu_before);
    let result = {
        let log = log.lock().expect("not poisoned");
        round(&log, nodes - 1, idle, busy)
    };
    drop(subscriptions);
    for reader in readers {
        reader.abort();
    }
    cluster.shutdown().await.map_err(|e| e.to_string())?;
    Ok(result)
}

pub(crate) async fn run(options: &Options) -> Result<serde_json::Value, String> {
    let nodes = options.nodes;
    let rounds = options.rounds.clamp(1, MAX_ROUNDS);
    let interval = Duration::from_secs(1) / options.rate as u32;
    let (mut raw, mut stack, mut node, mut broker) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for n in 0..rounds {
        eprintln!("round {}: raw gossipsub", n + 1);
        raw.push(bare_round(swarms(nodes, gossipsub_swarm)?, interval).await?);
        eprintln!("round {}: gossipsub in the libp2p stack", n + 1);
        // Holds the stack's stream protocols registered until the round is over.
        let mut incoming = Vec::new();
        let built = swarms(nodes, || stack_swarm(&mut incoming))?;
        stack.push(bare_round(built, interval).await?);
        drop(incoming);
        eprintln!("round {}: micromesh node gossip", n + 1);
        node.push(micromesh_round(nodes, interval, Layer::Node).await?);
        eprintln!("round {}: micromesh broker", n + 1);
        broker.push(micromesh_round(nodes, interval, Layer::Broker).await?);
    }
    let all = |rounds: &[Round]| -> Vec<Duration> {
        rounds
            .iter()
            .flat_map(|r| r.latencies.iter().copied())
            .collect()
    };
    let report = |rounds: &[Round]| {
        serde_json::json!({
            "latency": percentiles(all(rounds)),
            "delivery_ratio": rounds.iter().map(|r| r.delivery_ratio).collect::<Vec<_>>(),
            "idle_cpu_percent": rounds.iter().map(|r| r.idle_cpu_percent).collect::<Vec<_>>(),
            "cpu_ms_per_message": rounds.iter().map(|r| r.cpu_ms_per_message).collect::<Vec<_>>(),
        })
    };
    // Pooled over all rounds, and round by round: round i of two series ran minutes apart at
    // most, so the median of the per-round ratios is the figure least moved by a noisy spell.
    let ratios = |a: &[Round], b: &[Round]| {
        let (a_all, b_all) = (all(a), all(b));
        let ratio = |q: f64| quantile_ms(&a_all, q) / quantile_ms(&b_all, q);
        let per_round = |q: f64| -> Vec<f64> {
            a.iter()
                .zip(b)
                .map(|(a, b)| quantile_ms(&a.latencies, q) / quantile_ms(&b.latencies, q))
                .collect()
        };
        let (p50s, p99s) = (per_round(0.5), per_round(0.99));
        serde_json::json!({
            "latency_ratio_p50": ratio(0.5),
            "latency_ratio_p99": ratio(0.99),
            "median_of_rounds_p50": median(&p50s),
            "median_of_rounds_p99": median(&p99s),
            "per_round_p50": p50s,
            "per_round_p99": p99s,
        })
    };
    Ok(serde_json::json!({
        "scenario": "pubsub-bench",
        "nodes": nodes,
        "messages_per_round": MESSAGES,
        "rate_per_second": options.rate,
        "rounds": rounds,
        "raw_gossipsub": report(&raw),
        "libp2p_stack_gossipsub": report(&stack),
        "micromesh_node_gossip": report(&node),
        "micromesh_broker": report(&broker),
        "broker_vs_raw_gossipsub": ratios(&broker, &raw),
        "libp2p_stack_vs_raw_gossipsub": ratios(&stack, &raw),
        "broker_vs_libp2p_stack": ratios(&broker, &stack),
        "broker_vs_node_gossip": ratios(&broker, &node),
        "target": "broker latency <= 1.1x raw gossipsub",
    }))
}

/// The median of some ratios (the mean of the middle two for an even count); NaN for none.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_even_and_no_ratios() {
        assert_eq!(median(&[1.3, 0.9, 1.1]), 1.1);
        assert_eq!(median(&[1.4, 1.0, 1.2, 0.8]), 1.1);
        assert!(median(&[]).is_nan());
    }
}
