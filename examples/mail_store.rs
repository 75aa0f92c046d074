//! A mail store's producer: every change to a mailbox is published in the order the store
//! made it, with many batches in flight on one connection (`herald-client`'s publisher).
//! A mailbox's changes are one batch per store transaction: a delivery is `object_created`
//! plus `new_mail`; reading a message is `object_modified` of the message and of its folder's
//! unread count.
//!
//! `cargo run -p herald-client --example mail_store -- http://127.0.0.1:8470 200`
//! publishes 200 deliveries (and reads of every other one) over 4 mailboxes and prints the
//! last watermark.

use herald_client::{Client, EventJson};

fn event(key: String, kind: &str) -> EventJson {
    EventJson {
        key,
        kind: kind.into(),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let server = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:8470".into());
    let messages: u32 = args.next().map_or(Ok(200), |n| n.parse())?;
    let client = Client::new(&server)?;
    let publisher = client.publisher();
    let mut pending = Vec::new();
    let mut unread = [0u32; 4];
    for n in 0..messages {
        let mailbox = (n % 4) as usize;
        let folder = format!("example.test/user{mailbox}/inbox");
        let message = format!("{folder}/m{n}");
        // A delivery: the message appears, and it is new mail.
        unread[mailbox] += 1;
        let created = EventJson {
            object_type: Some("message".into()),
            parent: Some(folder.clone()),
            ..event(message.clone(), "object_created")
        };
        let new_mail = EventJson {
            parent: Some(folder.clone()),
            message_class: Some("IPM.Note".into()),
            ..event(message.clone(), "new_mail")
        };
        pending.push(publisher.send(vec![created, new_mail]).await?);
        if n % 2 == 1 {
            // The user reads it: the message and the folder's unread count change.
            unread[mailbox] -= 1;
            let read = EventJson {
                object_type: Some("message".into()),
                parent: Some(folder.clone()),
                ..event(message, "object_modified")
            };
            let count = EventJson {
                object_type: Some("folder".into()),
                unread_count: Some(unread[mailbox]),
                ..event(folder, "object_modified")
            };
            pending.push(publisher.send(vec![read, count]).await?);
        }
    }
    let mut last = 0;
    for p in pending {
        let answer = p.await?;
        let first = answer.watermarks[0];
        assert!(first > last, "appended out of order");
        last = *answer.watermarks.last().unwrap_or(&first);
    }
    println!("published {messages} deliveries in order; last watermark {last}");
    Ok(())
}
