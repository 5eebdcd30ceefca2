//! A service in a runtime of its own gives back everything it holds when it ends. Alone in its
//! test binary: it counts the file descriptors of the whole process.

use std::time::Duration;

use micromesh::{
    Service,
    node::Preset,
    testing::{Process, wait_until},
};

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("a Linux /proc")
        .count()
}

fn builder(round: usize) -> micromesh::service::Builder {
    Service::builder(format!("round-{round}"))
        .preset(Preset::Local)
        .network("process-lifetime")
        .listen("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .register(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_and_crashed_processes_leave_no_descriptors_behind() {
    // The first service of a process sets up what lives as long as the process (the TLS
    // library's entropy source, for one): it is not counted.
    Process::start(builder(0))
        .await
        .unwrap()
        .stop()
        .await
        .unwrap();
    let before = open_descriptors();

    for round in 1..=8 {
        let process = Process::start(builder(round)).await.unwrap();
        assert!(
            open_descriptors() > before,
            "a running service holds sockets"
        );
        if round % 2 == 0 {
            process.stop().await.unwrap();
        } else {
            process.crash();
        }
    }
    // A runtime shut down in the background closes its sockets on its own threads.
    wait_until(Duration::from_secs(10), || async {
        open_descriptors() <= before
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{} descriptors open after 8 services ended, {before} before",
            open_descriptors()
        )
    });
}
