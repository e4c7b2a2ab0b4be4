//! The bare NATS baselines the services are measured next to, each run as
//! its own process (`headcount-bench sink`, `headcount-bench echo`, hidden
//! commands) on the same client library as the services.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;

use crate::config::NatsArgs;

/// Counts messages on `subject` until `expect` have come or the publisher
/// has gone quiet for 3 s; says `ready` once subscribed, `count N` every
/// 10 000, and the count and seconds from first to last as JSON at the end.
pub async fn sink(nats: &NatsArgs, subject: &str, expect: u64) -> anyhow::Result<()> {
    let client = nats.options("headcount-bench-sink")?.connect().await?;
    let mut sub = client.subscribe(subject.to_string()).await?;
    client.flush().await?;
    println!("ready");
    let mut count = 0u64;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(3), sub.next()).await {
            Ok(Some(_)) => {
                count += 1;
                last = Instant::now();
                first.get_or_insert(last);
                if count == expect {
                    break;
                }
                if count.is_multiple_of(10_000) {
                    println!("count {count}");
                }
            }
            Ok(None) => break,
            Err(_) if first.is_some() => break, // idle: the publisher is done
            Err(_) => {}
        }
    }
    let secs = first.map_or(0.0, |f| (last - f).as_secs_f64());
    println!("{{\"count\":{count},\"secs\":{secs}}}");
    Ok(())
}

/// Answers every request on `subject` with a fixed reply; says `ready` once
/// subscribed.
pub async fn echo(nats: &NatsArgs, subject: &str) -> anyhow::Result<()> {
    let client = nats.options("headcount-bench-echo")?.connect().await?;
    let mut sub = client.subscribe(subject.to_string()).await?;
    client.flush().await?;
    println!("ready");
    // About the size of a check reply.
    let reply = Bytes::from_static(
        br#"{"allowed":true,"active":1,"limit":1000,"policy":"evict-oldest","evicted":[]}"#,
    );
    while let Some(msg) = sub.next().await {
        if let Some(r) = msg.reply {
            client.publish(r, reply.clone()).await?;
        }
    }
    Ok(())
}
