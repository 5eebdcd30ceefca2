//! Link delay for the lab, in user space: this kernel has no `netem`.
//!
//! `micromesh-simulations nat-peer delay --ms D` runs inside a namespace whose incoming packets
//! the lab sends to NFQUEUE 0 (`iptables -A INPUT -i DEV -j NFQUEUE --queue-num 0
//! --queue-bypass`). It holds every packet D ms (up to a millisecond more), then lets it go, in
//! order. It says `ready` once bound, and stops when stdin closes, letting through what it holds;
//! with it gone, `--queue-bypass` lets packets pass undelayed. Delaying what the hosts and the
//! internet's public nodes receive gives a round trip of 2·D between any two of them and 4·D
//! through a relay.
//!
//! Packets are held on the way in, not out: a TCP sender counts a packet held on its own host as
//! not yet sent, and its small-queue limit then lets two packets out per hold, about 0.2 MiB/s.
//! Routers are not delayed: a packet held there would hold an unconfirmed conntrack entry and
//! could change how the NAT picks ports.

use std::{
    collections::VecDeque,
    io::{ErrorKind, Read as _},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nfq::{Queue, Verdict};

/// The queue the lab's rules send packets to.
pub(crate) const QUEUE: u16 = 0;
/// How often the delayer looks for due packets and new ones: a packet is held up to this much
/// longer than asked. (A finer tick costs the lab's eleven delayers more CPU than the nodes.)
const TICK: Duration = Duration::from_millis(1);

/// Holds every packet of [`QUEUE`] for `delay`, until stdin closes.
pub(crate) fn run(delay: Duration) -> Result<(), String> {
    let mut queue = Queue::open().map_err(|e| format!("cannot open an NFQUEUE socket: {e}"))?;
    queue
        .bind(QUEUE)
        .map_err(|e| format!("cannot bind NFQUEUE {QUEUE}: {e}"))?;
    // Only the packets' metadata comes up, so that the socket's buffer holds many of them: a
    // packet that does not fit is lost, and loss is not what the lab asked for.
    queue
        .set_copy_range(QUEUE, 0)
        .and_then(|()| queue.set_queue_max_len(QUEUE, 65_536))
        .and_then(|()| queue.set_fail_open(QUEUE, true))
        // Large TCP segments (GSO) come up whole rather than cut in the kernel first.
        .and_then(|()| queue.set_recv_gso(QUEUE, true))
        .map_err(|e| format!("cannot set NFQUEUE {QUEUE} up: {e}"))?;
    queue.set_nonblocking(true);
    let done = Arc::new(AtomicBool::new(false));
    let stdin_closed = done.clone();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        stdin_closed.store(true, Ordering::Relaxed);
    });
    println!("{}", serde_json::json!({ "event": "ready" }));
    let mut held: VecDeque<(Instant, nfq::Message)> = VecDeque::new();
    while !done.load(Ordering::Relaxed) {
        loop {
            match queue.recv() {
                Ok(message) => held.push_back((Instant::now() + delay, message)),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(format!("NFQUEUE: {e}")),
            }
        }
        let now = Instant::now();
        while held.front().is_some_and(|(due, _)| *due <= now) {
            let (_, mut message) = held.pop_front().expect("checked");
            message.set_verdict(Verdict::Accept);
            queue
                .verdict(message)
                .map_err(|e| format!("NFQUEUE: {e}"))?;
        }
        std::thread::sleep(TICK);
    }
    for (_, mut message) in held {
        message.set_verdict(Verdict::Accept);
        queue
            .verdict(message)
            .map_err(|e| format!("NFQUEUE: {e}"))?;
    }
    Ok(())
}
