//! Ordered pipelined publishing for one producer connection: the producer sends batch after
//! batch without waiting; each is checked at once, handed to the log in the order it came
//! (so the log stores them in that order), and answered in that order. The batches of one
//! connection form a [`Sequence`]: once one fails, every later one is answered `aborted`
//! and not stored, until the producer restarts the sequence, so a failure never lets a later
//! batch land before the one that failed. At most `limit` batches are in flight; the
//! connection stops reading frames at that bound.
//!
//! With a log that pipelines sequences (the embedded log), many batches share each fsync;
//! with one that cannot (the cluster log), a connection's batches are appended one after
//! another, in the same order and with the same answers.

use std::future::Future;
use std::pin::Pin;

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use herald_core::Notification;
use herald_log::{AppendError, AppendOptions, Appended, EventLog, Sequence};
use tokio::sync::mpsc;

use crate::Log;
use crate::api::events::count_appended;
use crate::error::ApiError;

/// One batch, checked: what to append, or why it was refused before the log saw it.
struct Job {
    id: String,
    batch: Result<(Vec<Notification>, AppendOptions), ApiError>,
}

/// A batch's answer: its id and what became of it.
pub struct Answer {
    /// The producer's id for the batch.
    pub id: String,
    /// Its watermarks, or why it was not appended.
    pub result: Result<Appended, ApiError>,
}

/// A connection's publishing: the batches it sent and not yet answered.
pub struct Publisher {
    jobs: mpsc::Sender<Job>,
    answers: mpsc::Receiver<Answer>,
    sequence: Sequence,
    /// The id of the batch that broke the sequence, named in the later ones' answers.
    failed: Option<String>,
    in_flight: usize,
    limit: usize,
}

impl Publisher {
    /// A publisher over `log` with at most `limit` batches in flight (its task runs until
    /// the publisher is dropped and what is in flight is answered).
    pub fn new(log: Log, limit: usize) -> Publisher {
        let limit = limit.max(1);
        let (jobs, job_rx) = mpsc::channel(limit);
        let (answer_tx, answers) = mpsc::channel(limit);
        tokio::spawn(run(log, job_rx, answer_tx));
        Publisher {
            jobs,
            answers,
            sequence: Sequence::new(),
            failed: None,
            in_flight: 0,
            limit,
        }
    }

    /// Whether it holds as many batches as it may: read no more frames until one is
    /// answered.
    pub fn is_full(&self) -> bool {
        self.in_flight >= self.limit
    }

    /// Whether batches wait for an answer.
    pub fn is_busy(&self) -> bool {
        self.in_flight > 0
    }

    /// Hands over one batch, checked already (`Err`: refused before the log, which breaks
    /// the sequence). `restart` begins a new sequence first. Fails only if the publishing
    /// task is gone.
    pub fn push(
        &mut self,
        id: String,
        batch: Result<(Vec<Notification>, AppendOptions), ApiError>,
        restart: bool,
    ) -> Result<(), ApiError> {
        if restart {
            self.sequence = Sequence::new();
            self.failed = None;
        }
        // The place is taken here, in the order the batches came.
        let place = self.sequence.place();
        let batch = match batch {
            Ok((events, mut options)) => {
                options.place = Some(place);
                Ok((events, options))
            }
            Err(e) => {
                // Refused before the log: the batches after it must not be stored either.
                place.fail();
                Err(e)
            }
        };
        // The channel has room for `limit`, and `is_full` stops callers before that.
        self.jobs
            .try_send(Job { id, batch })
            .map_err(|_| ApiError::internal("the publishing task is gone"))?;
        self.in_flight += 1;
        Ok(())
    }

    /// The next answer, in the order the batches came. Pending while none is in flight.
    pub async fn next(&mut self) -> Option<Answer> {
        let mut answer = self.answers.recv().await?;
        self.in_flight -= 1;
        match &answer.result {
            Err(e) if e.code() == "aborted" => {
                let failed = self.failed.as_deref().unwrap_or("an earlier batch");
                answer.result = Err(ApiError::new(
                    e.status(),
                    "aborted",
                    format!(
                        "batch {failed} failed, so this one was not appended; resend from {failed} with restart: true"
                    ),
                ));
            }
            Err(_) => {
                if self.failed.is_none() {
                    self.failed = Some(answer.id.clone());
                }
            }
            Ok(_) => {}
        }
        Some(answer)
    }
}

type Appending<'a> = Pin<Box<dyn Future<Output = Answer> + Send + 'a>>;

/// Appends jobs in the order they come, with as many in flight as the log can pipeline,
/// and answers them in that order.
async fn run(log: Log, mut jobs: mpsc::Receiver<Job>, answers: mpsc::Sender<Answer>) {
    let pipelines = log.pipelines_sequences();
    let mut in_flight: FuturesOrdered<Appending<'_>> = FuturesOrdered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            job = jobs.recv(), if open && (pipelines || in_flight.is_empty()) => {
                let Some(Job { id, batch }) = job else {
                    open = false;
                    continue;
                };
                let appending: Appending<'_> = match batch {
                    Err(e) => Box::pin(std::future::ready(Answer { id, result: Err(e) })),
                    // Called here, in arrival order: that is the batch's place in the log.
                    Ok((events, options)) => {
                        let appended = log.append(events, options);
                        Box::pin(async move {
                            let result: Result<Appended, AppendError> = appended.await;
                            count_appended(&result);
                            Answer { id, result: result.map_err(ApiError::from) }
                        })
                    }
                };
                in_flight.push_back(appending);
            }
            Some(answer) = in_flight.next(), if !in_flight.is_empty() => {
                // A producer that went away is not told; its batches were appended or not
                // as they came.
                let _ = answers.send(answer).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::{Event, ObjectChange};
    use herald_log::SharedLog;
    use herald_testkit::memlog::MemoryLog;

    fn batch(key: &str) -> Result<(Vec<Notification>, AppendOptions), ApiError> {
        Ok((
            vec![Notification::new(
                key,
                Event::ObjectCreated(ObjectChange::default()),
            )],
            AppendOptions::default(),
        ))
    }

    /// A log that cannot pipeline gets a connection's batches one after another: the same
    /// order and answers, and the same abort after a failure.
    #[tokio::test]
    async fn a_log_that_cannot_pipeline_gets_the_batches_one_at_a_time_in_order() {
        let log = SharedLog::new(MemoryLog::new());
        assert!(!log.pipelines_sequences());
        let mut p = Publisher::new(log.clone(), 4);
        for i in 0..4 {
            p.push(format!("b{i}"), batch(&format!("k/{i}")), false)
                .unwrap();
        }
        assert!(p.is_full());
        for i in 0..4u64 {
            let a = p.next().await.unwrap();
            assert_eq!(a.id, format!("b{i}"));
            assert_eq!(a.result.unwrap().first.0, i + 1);
        }
        p.push("c0".into(), batch("k/c0"), false).unwrap();
        p.push(
            "c1".into(),
            Err(ApiError::field("events", "refused")),
            false,
        )
        .unwrap();
        p.push("c2".into(), batch("k/c2"), false).unwrap();
        let got: Vec<(String, Option<String>)> = [
            p.next().await.unwrap(),
            p.next().await.unwrap(),
            p.next().await.unwrap(),
        ]
        .into_iter()
        .map(|a| (a.id, a.result.err().map(|e| e.code().to_owned())))
        .collect();
        assert_eq!(
            got,
            [
                ("c0".to_owned(), None),
                ("c1".to_owned(), Some("invalid_field".to_owned())),
                ("c2".to_owned(), Some("aborted".to_owned())),
            ]
        );
        assert_eq!(log.bounds().unwrap().last.0, 5, "c2 was not appended");
        p.push("c2".into(), batch("k/c2"), true).unwrap();
        assert_eq!(p.next().await.unwrap().result.unwrap().first.0, 6);
    }
}
