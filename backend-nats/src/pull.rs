//! Pull requests of a subscription's own, over one inbox: every message the
//! server sends for them is seen, also a stored one whose header block
//! begins with a status line (which async-nats' own pull streams take for a
//! server status and drop, leaving it redelivered every `ack_wait`).
//!
//! Requests are served by the server in the order they were made, so the
//! open ones are kept in order: a stored message counts against the oldest,
//! and a request's end (408 expired, 409 ended) closes the oldest.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::{Client, StatusCode, Subject, Subscriber};
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use ticketrail_core::{Error, ErrorKind, Result};

/// The subject prefix of JetStream's acknowledgements: a message whose
/// reply subject starts with it is a stored message of the stream.
const ACK_PREFIX: &str = "$JS.ACK.";

/// What the inbox received.
pub(crate) enum Pulled {
    /// A message of the stream, to be delivered.
    Stored(async_nats::Message),
    /// The oldest open request ended.
    Ended,
    /// The server will not serve this consumer (it was deleted, or is
    /// something other than a pull consumer): why.
    Refused(String),
}

#[derive(Serialize)]
struct NextRequest {
    batch: usize,
    /// Nanoseconds.
    expires: u128,
}

/// The open requests of one subscription, and its inbox.
pub(crate) struct Puller {
    client: Client,
    inbox: Subject,
    messages: Subscriber,
    next_subject: String,
    /// Messages still to come for each open request, oldest first.
    open: VecDeque<usize>,
    expires: Duration,
}

impl Puller {
    pub(crate) async fn new(
        client: Client,
        stream: &str,
        consumer: &str,
        expires: Duration,
    ) -> Result<Self> {
        let inbox = Subject::from(client.new_inbox());
        let messages = client.subscribe(inbox.clone()).await.map_err(|e| {
            Error::new(ErrorKind::Connection, "subscribing to the pull inbox").with_source(e)
        })?;
        Ok(Puller {
            client,
            inbox,
            messages,
            next_subject: format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
            open: VecDeque::new(),
            expires,
        })
    }

    /// Messages asked for and not yet received, over all open requests.
    pub(crate) fn outstanding(&self) -> usize {
        self.open.iter().sum()
    }

    /// How many requests are open.
    pub(crate) fn open_requests(&self) -> usize {
        self.open.len()
    }

    /// Asks for up to `batch` messages, for at most the pull expiry.
    pub(crate) async fn request(&mut self, batch: usize) -> Result<()> {
        let body = serde_json::to_vec(&NextRequest {
            batch,
            expires: self.expires.as_nanos(),
        })
        .expect("a request always encodes");
        self.client
            .publish_with_reply(self.next_subject.clone(), self.inbox.clone(), body.into())
            .await
            .map_err(|e| {
                Error::new(ErrorKind::Connection, "sending a pull request").with_source(e)
            })?;
        self.open.push_back(batch);
        Ok(())
    }

    /// Forgets the open requests: after the connection broke, their answers
    /// may never come.
    pub(crate) fn forget_requests(&mut self) {
        self.open.clear();
    }

    /// Closes the inbox: once this returns, the server has dropped its
    /// interest, so it sends nothing more for the open requests (it checks
    /// a request's interest before each message). Returns the stored
    /// messages the inbox had received and nobody took, to be released.
    ///
    /// The client forgets the inbox as it sends the unsubscribe, so a
    /// message the server sent just before reading it is left to the
    /// redelivery timeout: a window of one round trip. Without this, the
    /// window lasts as long as the open requests (up to the pull expiry),
    /// and everything received but not taken waits for that timeout too.
    pub(crate) async fn close(&mut self, timeout: Duration) -> Vec<async_nats::Message> {
        if self.messages.unsubscribe().await.is_ok() {
            // The server reads a connection's commands in order: its answer
            // to a request sent after the unsubscribe (here "no responders",
            // to a subject nobody serves) says it has read the unsubscribe.
            let barrier = self
                .client
                .request(self.client.new_inbox(), bytes::Bytes::new());
            let _ = tokio::time::timeout(timeout, barrier).await;
        }
        self.open.clear();
        let mut left = Vec::new();
        // The inbox is closed: this yields what it holds, then ends.
        while let Some(message) = self.messages.next().await {
            if let Some(Pulled::Stored(message)) = self.read(message) {
                left.push(message);
            }
        }
        left
    }

    /// The next thing the inbox receives; `None` if the client is closed.
    pub(crate) async fn next(&mut self) -> Option<Pulled> {
        loop {
            let message = self.messages.next().await?;
            if let Some(pulled) = self.read(message) {
                return Some(pulled);
            }
        }
    }

    /// What the inbox has already received, without waiting; `None` if it
    /// has nothing yet (or is closed: `next` says so).
    pub(crate) fn try_next(&mut self) -> Option<Pulled> {
        loop {
            let message = self.messages.next().now_or_never()??;
            if let Some(pulled) = self.read(message) {
                return Some(pulled);
            }
        }
    }

    /// What a message the inbox received means; `None` for those that
    /// mean nothing here (idle heartbeats).
    fn read(&mut self, message: async_nats::Message) -> Option<Pulled> {
        if message
            .reply
            .as_ref()
            .is_some_and(|r| r.as_str().starts_with(ACK_PREFIX))
        {
            if let Some(front) = self.open.front_mut() {
                *front = front.saturating_sub(1);
                if *front == 0 {
                    self.open.pop_front();
                }
            }
            return Some(Pulled::Stored(message));
        }
        match message.status {
            // Expired, nothing to send (no-wait), or ended by the server
            // for any other reason (batch done, max bytes, a leader
            // change): the oldest request is over.
            Some(StatusCode::TIMEOUT)
            | Some(StatusCode::NOT_FOUND)
            | Some(StatusCode::REQUEST_TERMINATED) => {
                self.open.pop_front();
                Some(Pulled::Ended)
            }
            // Nobody serves the consumer's pull subject: the consumer
            // was deleted, or its stream has no leader for now.
            Some(StatusCode::NO_RESPONDERS) => {
                self.open.pop_front();
                Some(Pulled::Refused(
                    "no server serves the queue's consumer (deleted, or its stream has no \
                     leader for now)"
                        .to_owned(),
                ))
            }
            // Idle heartbeats and anything else without a stored message.
            _ => None,
        }
    }
}
