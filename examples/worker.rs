//! A backend worker on a durable subscription: it processes each event, then acknowledges it,
//! so a restarted worker resumes after the last event it finished and nothing is skipped.
//! Here the work is counting new mail per mailbox.
//!
//! `cargo run -p herald-client --example worker -- http://127.0.0.1:8470 <subscription> <events>`
//! processes `<events>` events of the durable subscription (with `new`: one created for new
//! mail under `example.test`), prints the counts and the last watermark acknowledged, and
//! exits. Run it twice: the second run starts after the first one's acknowledgement.

use std::collections::BTreeMap;

use herald_client::{Client, Subscribe};
use herald_core::Event;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let server = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8470".into());
    let name = args.next().unwrap_or_else(|| "new".into());
    let wanted: usize = args.next().map_or(Ok(100), |n| n.parse())?;
    let client = Client::new(&server)?;
    let name = if name == "new" {
        client
            .create_subscription(
                &Subscribe::subtree("example.test")
                    .kinds("new_mail")
                    .after(0),
            )
            .await?
    } else {
        name
    };
    println!("subscription {name}");
    let subscriber = client.subscriber();
    let mut events = subscriber.subscribe(Subscribe::durable(&name)).await?;
    println!("starting after {}", events.started_after());
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let mut done = 0;
    while done < wanted {
        let Some(event) = events.next().await else {
            break;
        };
        let event = event?;
        // The work: count new mail per mailbox.
        if let Event::NewMail(_) = &event.notification.event {
            let mailbox = event
                .json
                .key
                .split('/')
                .nth(1)
                .unwrap_or_default()
                .to_owned();
            *counts.entry(mailbox).or_default() += 1;
        }
        done += 1;
        // Only once the work is done; the last one is waited for, since the process exits.
        if done == wanted {
            events.ack_stored(event.watermark).await?;
            println!("acknowledged through {}", event.watermark);
        } else {
            events.ack(event.watermark)?;
        }
    }
    for (mailbox, n) in &counts {
        println!("{mailbox}: {n} new");
    }
    Ok(())
}
