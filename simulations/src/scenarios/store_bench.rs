//! `store-bench`: write and read latency of the micromesh store against raw Kademlia
//! `put_record` / `get_record`, on N in-process nodes (memory transport, Noise, yamux), in one
//! run.
//!
//! The baseline is a bare libp2p swarm per node with only Kademlia (memory record store, the
//! same replication factor of 5, server mode, every node's address known to every other).
//! Both series do the same work: `OPS` writes of 256-byte values under fresh keys, each from a
//! node chosen in turn, with a write quorum of 3 (`Quorum::N(3)` in the baseline); then `OPS`
//! reads of those keys from other nodes, each collecting up to 3 copies (the store's read
//! quorum; the baseline stops its query at the third record found). One operation at a time,
//! so the figures are latencies, not throughput. Rounds alternate baseline and micromesh.
//!
//! The store does more per operation: it signs and checks records, writes the table's index
//! shard next to every record (two DHT puts in parallel), and its nodes run the full micromesh
//! stack (identify, ping, gossipsub, relay, keep-alive, streams) on every connection.

use std::{num::NonZeroUsize, time::Duration};

use futures::StreamExt as _;
use libp2p::{
    Multiaddr, PeerId, StreamProtocol, Swarm, SwarmBuilder,
    core::{Transport as _, transport::MemoryTransport, upgrade::Version},
    kad, noise,
    swarm::SwarmEvent,
    yamux,
};
use micromesh::testing::{Cluster, wait_until};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use crate::measure::{Options, cpu_time, percentiles, quantile_ms};

/// Writes (and reads) per round.
const OPS: usize = 100;
const VALUE: usize = 256;
const QUORUM: usize = 3;
const REPLICATION: usize = 5;
/// How long a fresh mesh settles before the measurement.
const SETTLE: Duration = Duration::from_secs(5);

/// What one round measured.
struct Round {
    writes: Vec<Duration>,
    reads: Vec<Duration>,
    failed_writes: usize,
    missed_reads: usize,
    cpu_ms_per_op: f64,
}

enum Op {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        reply: oneshot::Sender<bool>,
    },
    Get {
        key: Vec<u8>,
        reply: oneshot::Sender<bool>,
    },
}

fn raw_swarm() -> Result<Swarm<kad::Behaviour<kad::store::MemoryStore>>, String> {
    Ok(SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_other_transport(|key| {
            Ok(MemoryTransport::default()
                .upgrade(Version::V1)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default()))
        })
        .map_err(|e| e.to_string())?
        .with_behaviour(|key| {
            let peer = key.public().to_peer_id();
            let mut config = kad::Config::new(StreamProtocol::new("/store-bench/kad/1.0.0"));
            config
                .set_replication_factor(NonZeroUsize::new(REPLICATION).expect("> 0"))
                .set_max_packet_size(2 * 1024 * 1024)
                .set_record_ttl(None);
            let mut kad =
                kad::Behaviour::with_config(peer, kad::store::MemoryStore::new(peer), config);
            kad.set_mode(Some(kad::Mode::Server));
            kad
        })
        .map_err(|e| e.to_string())?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build())
}

/// Runs one raw swarm: answers `Op`s, one query at a time per op.
async fn drive(
    mut swarm: Swarm<kad::Behaviour<kad::store::MemoryStore>>,
    mut ops: mpsc::Receiver<Op>,
) {
    enum Pending {
        Put(oneshot::Sender<bool>),
        Get(usize, oneshot::Sender<bool>),
    }
    let mut pending: std::collections::HashMap<kad::QueryId, Pending> = Default::default();
    loop {
        tokio::select! {
            op = ops.recv() => match op {
                Some(Op::Put { key, value, reply }) => {
                    let record = kad::Record::new(key, value);
                    let quorum = kad::Quorum::N(NonZeroUsize::new(QUORUM).expect("> 0"));
                    match swarm.behaviour_mut().put_record(record, quorum) {
                        Ok(id) => { pending.insert(id, Pending::Put(reply)); }
                        Err(_) => { let _ = reply.send(false); }
                    }
                }
                Some(Op::Get { key, reply }) => {
                    let id = swarm.behaviour_mut().get_record(kad::RecordKey::new(&key));
                    pending.insert(id, Pending::Get(0, reply));
                }
                None => break,
            },
            event = swarm.select_next_some() => {
                let SwarmEvent::Behaviour(kad::Event::OutboundQueryProgressed { id, result, step, .. }) = event else {
                    continue;
                };
                let Some(p) = pending.remove(&id) else { continue };
                match (p, result) {
                    (Pending::Put(reply), kad::QueryResult::PutRecord(r)) => {
                        let _ = reply.send(r.is_ok());
                    }
                    (Pending::Get(found, reply), kad::QueryResult::GetRecord(r)) => {
                        let found = found + usize::from(matches!(r, Ok(kad::GetRecordOk::FoundRecord(_))));
                        if found >= QUORUM || step.last {
                            if let Some(mut q) = swarm.behaviour_mut().query_mut(&id) {
                                q.finish();
                            }
                            let _ = reply.send(found > 0);
                        } else {
                            pending.insert(id, Pending::Get(found, reply));
                        }
                    }
                    (p, _) => { pending.insert(id, p); }
                }
            }
        }
    }
}

async fn raw_round(nodes: usize) -> Result<Round, String> {
    let mut swarms = Vec::new();
    let mut peers: Vec<(PeerId, Multiaddr)> = Vec::new();
    for _ in 0..nodes {
        let mut swarm = raw_swarm()?;
        swarm
            .listen_on("/memory/0".parse().expect("valid"))
            .map_err(|e| e.to_string())?;
        let addr = loop {
            if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
                break address;
            }
        };
        peers.push((*swarm.local_peer_id(), addr));
        swarms.push(swarm);
    }
    // Every node is told of every other (the k-buckets keep what fits).
    for swarm in &mut swarms {
        for (peer, addr) in &peers {
            if peer != swarm.local_peer_id() {
                swarm.behaviour_mut().add_address(peer, addr.clone());
            }
        }
    }
    let mut handles = Vec::new();
    let mut tasks = Vec::new();
    for swarm in swarms {
        let (tx, rx) = mpsc::channel(4);
        handles.push(tx);
        tasks.push(tokio::spawn(drive(swarm, rx)));
    }
    tokio::time::sleep(SETTLE).await;
    let op = |i: usize, make: Box<dyn FnOnce(oneshot::Sender<bool>) -> Op + Send>| {
        let handle = handles[i % nodes].clone();
        async move {
            let (reply, rx) = oneshot::channel();
            handle
                .send(make(reply))
                .await
                .map_err(|_| "raw node stopped")?;
            rx.await.map_err(|_| "raw node stopped".to_owned())
        }
    };
    let cpu_before = cpu_time();
    let (mut writes, mut reads, mut failed, mut missed) = (Vec::new(), Vec::new(), 0, 0);
    for n in 0..OPS {
        let key = format!("bench/{n}").into_bytes();
        let started = Instant::now();
        let ok = op(
            n,
            Box::new(move |reply| Op::Put {
                key,
                value: vec![7; VALUE],
                reply,
            }),
        )
        .await?;
        writes.push(started.elapsed());
        failed += usize::from(!ok);
    }
    for n in 0..OPS {
        let key = format!("bench/{n}").into_bytes();
        let started = Instant::now();
        let ok = op(n + nodes / 2, Box::new(move |reply| Op::Get { key, reply })).await?;
        reads.push(started.elapsed());
        missed += usize::from(!ok);
    }
    let busy = cpu_time().saturating_sub(cpu_before);
    drop(handles);
    for task in tasks {
        task.abort();
    }
    Ok(Round {
        writes,
        reads,
        failed_writes: failed,
        missed_reads: missed,
        cpu_ms_per_op: busy.as_secs_f64() * 1000.0 / (2 * OPS) as f64,
    })
}

async fn micromesh_round(nodes: usize) -> Result<Round, String> {
    let cluster = Cluster::builder()
        .size(nodes)
        .network("store-bench")
        .build()
        .await
        .map_err(|e| e.to_string())?;
    // Routing tables filled, as in the baseline (a k-bucket holds 20 peers, so a table of a
    // large mesh never holds every peer).
    let want = (nodes - 1).min(20);
    for i in 0..nodes {
        let node = cluster.node(i).clone();
        wait_until(Duration::from_secs(120), || async {
            node.dht_peers().await.map_or(0, |p| p.len()) >= want
        })
        .await
        .map_err(|_| format!("node {i} did not learn {want} peers in time"))?;
    }
    tokio::time::sleep(SETTLE).await;
    let cpu_before = cpu_time();
    let (mut writes, mut reads, mut failed, mut missed) = (Vec::new(), Vec::new(), 0, 0);
    for n in 0..OPS {
        let store = cluster.service(n % nodes).store();
        let started = Instant::now();
        let ok = store
            .write(&format!("bench/{n}"), vec![7; VALUE])
            .await
            .is_ok();
        writes.push(started.elapsed());
        failed += usize::from(!ok);
    }
    for n in 0..OPS {
        let store = cluster.service((n + nodes / 2) % nodes).store();
        let started = Instant::now();
        let ok = matches!(store.read(&format!("bench/{n}")).await, Ok(Some(_)));
        reads.push(started.elapsed());
        missed += usize::from(!ok);
    }
    let busy = cpu_time().saturating_sub(cpu_before);
    cluster.shutdown().await.map_err(|e| e.to_string())?;
    Ok(Round {
        writes,
        reads,
        failed_writes: failed,
        missed_reads: missed,
        cpu_ms_per_op: busy.as_secs_f64() * 1000.0 / (2 * OPS) as f64,
    })
}

pub(crate) async fn run(options: &Options) -> Result<serde_json::Value, String> {
    let nodes = options.nodes;
    let rounds = options.rounds.clamp(1, 4);
    let (mut raw, mut mesh) = (Vec::new(), Vec::new());
    for n in 0..rounds {
        eprintln!("round {}: raw Kademlia", n + 1);
        raw.push(raw_round(nodes).await?);
        eprintln!("round {}: micromesh store", n + 1);
        mesh.push(micromesh_round(nodes).await?);
    }
    let all = |rounds: &[Round], reads: bool| -> Vec<Duration> {
        rounds
            .iter()
            .flat_map(|r| {
                if reads {
                    r.reads.clone()
                } else {
                    r.writes.clone()
                }
            })
            .collect()
    };
    let report = |rounds: &[Round]| {
        serde_json::json!({
            "write": percentiles(all(rounds, false)),
            "read": percentiles(all(rounds, true)),
            "failed_writes": rounds.iter().map(|r| r.failed_writes).sum::<usize>(),
            "missed_reads": rounds.iter().map(|r| r.missed_reads).sum::<usize>(),
            "cpu_ms_per_op": rounds.iter().map(|r| r.cpu_ms_per_op).collect::<Vec<_>>(),
        })
    };
    let ratio = |reads: bool, q: f64| {
        quantile_ms(&all(&mesh, reads), q) / quantile_ms(&all(&raw, reads), q)
    };
    Ok(serde_json::json!({
        "scenario": "store-bench",
        "nodes": nodes,
        "ops_per_round": OPS,
        "value_bytes": VALUE,
        "rounds": rounds,
        "raw_kademlia": report(&raw),
        "micromesh_store": report(&mesh),
        "store_vs_raw_kademlia": {
            "write_latency_ratio_p50": ratio(false, 0.5),
            "write_latency_ratio_p99": ratio(false, 0.99),
            "read_latency_ratio_p50": ratio(true, 0.5),
            "read_latency_ratio_p99": ratio(true, 0.99),
        },
    }))
}
