//! How a service ends when nobody stops it: the last handle dropped.

use std::time::Duration;

use micromesh::{
    Service,
    node::Preset,
    testing::{Cluster, wait_until},
};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_stops_the_service_and_withdraws_it() {
    let cluster = Cluster::builder()
        .size(1)
        .network("lifetime")
        .build()
        .await
        .unwrap();
    let ephemeral = Service::builder("ephemeral")
        .preset(Preset::Local)
        .network(cluster.network())
        .bootstrap(cluster.bootstrap_addr().clone())
        .build()
        .await
        .unwrap();
    let registry = cluster.service(0).registry().clone();
    wait_until(WAIT, || async {
        registry
            .get_service("ephemeral")
            .await
            .is_ok_and(|entries| !entries.is_empty())
    })
    .await
    .expect("the bootstrap node sees the service");

    let node = ephemeral.node().clone();
    drop(ephemeral);
    let reason = tokio::time::timeout(WAIT, node.stopped())
        .await
        .expect("the node stops once the last service handle is gone");
    assert!(
        node.listen_addrs().await.is_err(),
        "a stopped node answers no command; it stopped because: {reason}"
    );
    wait_until(WAIT, || async {
        registry
            .get_service("ephemeral")
            .await
            .map_or(true, |entries| entries.is_empty())
    })
    .await
    .expect("the service announced its leave");
    cluster.shutdown().await.unwrap();
}
