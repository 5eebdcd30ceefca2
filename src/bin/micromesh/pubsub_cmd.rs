//! `micromesh publish` and `micromesh subscribe`: the broker from the command line.

use std::{io::Write as _, time::Duration};

use clap::Args;
use micromesh::{
    Multiaddr, Status,
    broker::{Message, PublishOptions, SubscribeOptions},
    codec::ContentType,
};
use tokio::sync::{mpsc, oneshot};

use crate::cli::{BoxError, Global, Join, parse_duration};

#[derive(Args, Debug)]
pub(crate) struct PublishArgs {
    /// The topic, e.g. `orders.created`.
    topic: String,
    /// The message as JSON, e.g. '{"id": 42}'.
    message: String,
    /// A header sent with the message, as KEY=VALUE (repeatable).
    #[arg(long = "header", short = 'H', value_name = "KEY=VALUE")]
    headers: Vec<String>,
    /// How long to look for a subscriber when none is known.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    wait: Duration,
    /// Send even if no subscriber is found (the message may reach nobody).
    #[arg(long)]
    allow_no_subscribers: bool,
    /// How long to wait for queue groups to acknowledge the message.
    #[arg(long = "ack-timeout", default_value = "30s", value_parser = parse_duration)]
    ack_timeout: Duration,
    #[command(flatten)]
    join: Join,
}

#[derive(Args, Debug)]
pub(crate) struct SubscribeArgs {
    /// The topic.
    topic: String,
    /// Join this queue group: each message goes to one member of the group.
    #[arg(long, value_name = "GROUP")]
    group: Option<String>,
    /// Exit after this many messages.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Where this subscriber listens, so that publishers can reach it (repeatable).
    #[arg(
        long,
        value_name = "MULTIADDR",
        default_values = ["/ip4/0.0.0.0/udp/0/quic-v1", "/ip4/0.0.0.0/tcp/0"]
    )]
    listen: Vec<Multiaddr>,
    #[command(flatten)]
    join: Join,
}

pub(crate) async fn publish(global: &Global, args: &PublishArgs) -> Result<(), BoxError> {
    let message: serde_json::Value = serde_json::from_str(&args.message)
        .map_err(|e| format!("the message is not valid JSON ({e}): {}", args.message))?;
    let mut options = PublishOptions::new()
        .content_type(ContentType::Json)
        .wait_for_subscribers(args.wait);
    for entry in &args.headers {
        let (k, v) = entry
            .split_once('=')
            .ok_or_else(|| format!("a header must be KEY=VALUE, got {entry:?}"))?;
        options = options.header(k, v);
    }
    if args.allow_no_subscribers {
        options = options.allow_no_subscribers();
    }
    let service = args.join.connect().await?;
    let published = service
        .broker()
        .publish_with(&args.topic, &message, options)
        .await;
    // Wait for the queue groups' acknowledgements before the node stops.
    let outcome = match published {
        Ok(published) => {
            let (id, subscribers) = (published.id, published.subscribers);
            let groups = tokio::time::timeout(args.ack_timeout, published.delivered()).await;
            Ok((id, subscribers, groups))
        }
        Err(e) => Err(e),
    };
    let stopped = service.stop().await;
    let (id, subscribers, groups) = outcome?;
    let groups = groups.map_err(|_| {
        format!(
            "published {id}, but the queue groups did not acknowledge it within {:?} (--ack-timeout)",
            args.ack_timeout
        )
    })?;
    stopped?;
    if global.json {
        let groups: Vec<_> = groups
            .iter()
            .map(|g| {
                serde_json::json!({
                    "group": g.group,
                    "member": g.member.map(|m| m.to_string()),
                    "attempts": g.attempts,
                    "error": g.error,
                })
            })
            .collect();
        let out = serde_json::json!({
            "topic": args.topic,
            "id": id.to_string(),
            "publisher": id.publisher.to_string(),
            "seq": id.seq,
            "subscribers": subscribers,
            "groups": groups,
        });
        println!("{out}");
    } else {
        println!("published on {}: {id}", args.topic);
        println!("  subscribers reached directly: {subscribers}");
        for g in &groups {
            match (&g.member, &g.error) {
                (Some(member), _) => println!(
                    "  group {}: taken by {member} (attempt {})",
                    g.group, g.attempts
                ),
                (None, error) => println!(
                    "  group {}: NOT delivered after {} attempt(s): {}",
                    g.group,
                    g.attempts,
                    error.as_deref().unwrap_or("unknown reason")
                ),
            }
        }
        if subscribers == 0 && groups.is_empty() {
            println!("  (sent without subscribers: --allow-no-subscribers)");
        }
    }
    let lost: Vec<&str> = groups
        .iter()
        .filter(|g| g.member.is_none())
        .map(|g| g.group.as_str())
        .collect();
    if !lost.is_empty() {
        return Err(format!(
            "the message was not delivered to queue group(s) {}",
            lost.join(", ")
        )
        .into());
    }
    Ok(())
}

/// A message body as JSON: JSON as is, CBOR converted, anything else as hex.
fn body_json(message: &Message) -> serde_json::Value {
    match ContentType::from_mime(&message.content_type) {
        Ok(ContentType::Json) | Ok(ContentType::Cbor) => message
            .decode::<serde_json::Value>()
            .unwrap_or_else(|e| serde_json::json!({ "undecodable": e.to_string() })),
        _ => {
            let hex: String = message.body.iter().map(|b| format!("{b:02x}")).collect();
            serde_json::json!({ "hex": hex })
        }
    }
}

fn message_json(message: &Message) -> serde_json::Value {
    let published_ms = message
        .published_at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let headers: serde_json::Map<String, serde_json::Value> = message
        .headers
        .iter()
        .map(|(k, v)| (k.to_owned(), serde_json::Value::from(v)))
        .collect();
    serde_json::json!({
        "topic": message.topic,
        "id": message.id.to_string(),
        "publisher": message.publisher.to_string(),
        "seq": message.id.seq,
        "published_at_ms": published_ms,
        "content_type": message.content_type,
        "headers": headers,
        "group": message.group,
        "attempt": message.attempt,
        "body": body_json(message),
    })
}

pub(crate) async fn subscribe(global: &Global, args: &SubscribeArgs) -> Result<(), BoxError> {
    let service = args.join.connect_listening(&args.listen).await?;
    let (tx, mut rx) = mpsc::channel::<(Message, oneshot::Sender<()>)>(256);
    let mut options = SubscribeOptions::new();
    if let Some(group) = &args.group {
        options = options.group(group.clone());
    }
    let subscribed = service
        .broker()
        .subscribe_raw(&args.topic, options, move |message: Message| {
            let tx = tx.clone();
            async move {
                // Acknowledge (queue groups) only once the message is printed.
                let (printed, done) = oneshot::channel();
                let exiting = || Status::unavailable("the subscriber is exiting");
                tx.send((message, printed)).await.map_err(|_| exiting())?;
                done.await.map_err(|_| exiting())
            }
        })
        .await;
    let subscription = match subscribed {
        Ok(subscription) => subscription,
        Err(e) => {
            service.stop().await?;
            return Err(e.into());
        }
    };
    match &args.group {
        Some(group) => eprintln!("subscribed to {} in group {group}", args.topic),
        None => eprintln!("subscribed to {}", args.topic),
    }
    let mut printed = 0u64;
    let outcome: Result<(), BoxError> = async {
        let signal = micromesh::service::shutdown_signal();
        tokio::pin!(signal);
        while args.count.is_none_or(|n| printed < n) {
            let message = tokio::select! {
                message = rx.recv() => match message {
                    Some(message) => message,
                    None => break,
                },
                result = &mut signal => {
                    result?;
                    break;
                }
            };
            let (message, printed_ack) = message;
            let line = if global.json {
                message_json(&message)
            } else {
                body_json(&message)
            };
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "{line}")?;
            stdout.flush()?;
            let _ = printed_ack.send(());
            printed += 1;
        }
        Ok(())
    }
    .await;
    // Leave the group (or topic), and let the acknowledgements of what was printed reach their
    // publishers before the connections close.
    drop(subscription);
    service.broker().flush(Duration::from_secs(5)).await;
    service.stop().await?;
    outcome
}
