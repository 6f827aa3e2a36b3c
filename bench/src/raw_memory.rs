//! The raw baseline for the in-process broker: a tokio mpsc channel.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::mpsc;

use crate::side::{at_rate, BenchResult, Side};
use crate::workload::{now_ns, payload, EmailMessage};

pub(crate) struct RawMemory {
    tx: mpsc::Sender<Vec<u8>>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>>,
}

impl RawMemory {
    pub(crate) fn new(capacity: usize) -> Self {
        let (tx, rx) = mpsc::channel(capacity);
        RawMemory {
            tx,
            rx: Arc::new(tokio::sync::Mutex::new(rx)),
        }
    }
}

#[async_trait]
impl Side for RawMemory {
    async fn publish(&self, count: usize, _window: usize) -> BenchResult<Duration> {
        let started = Instant::now();
        for i in 0..count {
            self.tx.send(payload(i)).await?;
        }
        Ok(started.elapsed())
    }

    async fn consume(
        &self,
        count: usize,
        _prefetch: u16,
        consumers: usize,
    ) -> BenchResult<Duration> {
        let started = Instant::now();
        if consumers <= 1 {
            let mut rx = self.rx.lock().await;
            for _ in 0..count {
                let bytes = rx.recv().await.ok_or("channel closed")?;
                let email: EmailMessage = serde_json::from_slice(&bytes)?;
                std::hint::black_box(email);
            }
            return Ok(started.elapsed());
        }
        // Competing receivers, each a task, take turns at the channel's
        // receiver and decode in parallel.
        let taken = Arc::new(AtomicUsize::new(0));
        let mut receivers = tokio::task::JoinSet::new();
        for _ in 0..consumers {
            let (rx, taken) = (Arc::clone(&self.rx), Arc::clone(&taken));
            receivers.spawn(async move {
                while taken.fetch_add(1, Ordering::Relaxed) < count {
                    let bytes = rx.lock().await.recv().await.ok_or("channel closed")?;
                    let email: EmailMessage = serde_json::from_slice(&bytes)?;
                    std::hint::black_box(email);
                }
                BenchResult::Ok(())
            });
        }
        while let Some(done) = receivers.join_next().await {
            done??;
        }
        Ok(started.elapsed())
    }

    async fn latency(
        &self,
        count: usize,
        per_second: u32,
        _prefetch: u16,
    ) -> BenchResult<Vec<f64>> {
        let samples = Mutex::new(Vec::with_capacity(count));
        let tx = self.tx.clone();
        let receive = async {
            let mut rx = self.rx.lock().await;
            for _ in 0..count {
                let bytes = rx.recv().await.ok_or("channel closed")?;
                let email: EmailMessage = serde_json::from_slice(&bytes)?;
                let micros = (now_ns().saturating_sub(email.sent_at_ns)) as f64 / 1000.0;
                samples.lock().expect("not poisoned").push(micros);
            }
            BenchResult::Ok(())
        };
        let send = at_rate(count, per_second, move |i| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(payload(i)).await;
            }
        });
        let (received, ()) = tokio::join!(receive, send);
        received?;
        Ok(samples.into_inner().expect("not poisoned"))
    }

    async fn teardown(&self) -> BenchResult<()> {
        Ok(())
    }
}
