//! A publish handed to the broker, whose confirm is still to come.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::BoxFuture;

use crate::error::Result;
use crate::metrics::PublisherMetrics;
use crate::trace::PublishSpan;

/// The broker's confirm of one message handed over by
/// [`Broker::send`](crate::Broker::send) or [`Publisher::send`](crate::Publisher::send).
///
/// Awaiting it gives what [`Broker::publish`](crate::Broker::publish) would
/// have returned: `Ok` once the broker has durably accepted the message
/// (C1), or the error that says why not. Many can be pending at once: keep a
/// window of them and await the oldest, as with the raw clients.
///
/// Dropping a `Confirmation` does not take the message back: it may still
/// be delivered, only nobody learns whether it was.
#[must_use = "a message is published only once its confirmation resolves to Ok"]
pub struct Confirmation {
    id: String,
    /// `None` for a broker that confirms before `send` returns: nothing is
    /// boxed for those.
    confirm: Option<BoxFuture<'static, Result<()>>>,
    /// Counts the message and ends its publish span once settled.
    observed: Option<Observed>,
}

/// What a publish through [`Publisher`](crate::Publisher) or
/// [`Broker::publish`](crate::Broker::publish) records once the broker answers.
struct Observed {
    metrics: PublisherMetrics,
    span: PublishSpan,
}

impl Confirmation {
    /// The confirmation of message `id`, which `confirm` awaits.
    pub fn new(id: String, confirm: impl Future<Output = Result<()>> + Send + 'static) -> Self {
        Confirmation {
            id,
            confirm: Some(Box::pin(confirm)),
            observed: None,
        }
    }

    /// The confirmation of message `id`, already confirmed: for brokers
    /// that accept a message before `send` returns.
    pub fn confirmed(id: String) -> Self {
        Confirmation {
            id,
            confirm: None,
            observed: None,
        }
    }

    /// The id of the message.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Waits for the broker's confirm and returns the message's id.
    pub(crate) async fn id_once_confirmed(mut self) -> Result<String> {
        let id = std::mem::take(&mut self.id);
        (&mut self).await?;
        Ok(id)
    }

    /// The same confirmation, counted in `metrics` and ending `span` once
    /// the broker answers.
    pub(crate) fn observed(mut self, metrics: PublisherMetrics, span: PublishSpan) -> Self {
        self.observed = Some(Observed { metrics, span });
        self
    }
}

impl Future for Confirmation {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        let confirmed = match this.confirm.as_mut() {
            Some(confirm) => confirm.as_mut().poll(cx),
            None => Poll::Ready(Ok(())),
        };
        if let Poll::Ready(result) = &confirmed {
            if let Some(Observed { metrics, span }) = this.observed.take() {
                let error = result.as_ref().err();
                metrics.sent(error.map(|e| e.kind()));
                span.end(error);
            }
        }
        confirmed
    }
}

impl fmt::Debug for Confirmation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Confirmation")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}
