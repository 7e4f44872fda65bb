//! The background tasks a component owns (the cluster's heartbeats and
//! deliveries, the scrub and read repair's rewrites): started until the
//! component shuts down, then stopped and waited for, so none holds the
//! block manager any more.

use parking_lot::Mutex;
use std::future::Future;
use tokio::task::JoinHandle;

/// Tasks started with [`Tasks::spawn`]; after [`Tasks::stop`], none starts.
#[derive(Debug, Default)]
pub(crate) struct Tasks(Mutex<(bool, Vec<JoinHandle<()>>)>);

impl Tasks {
    /// Runs `f` in the background until it ends or [`Tasks::stop`]; after
    /// a stop, drops it instead.
    pub(crate) fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        let mut t = self.0.lock();
        if t.0 {
            return;
        }
        t.1.retain(|h| !h.is_finished());
        t.1.push(tokio::spawn(f));
    }

    /// Stops every task and waits until each has ended.
    pub(crate) async fn stop(&self) {
        let tasks = {
            let mut t = self.0.lock();
            t.0 = true;
            std::mem::take(&mut t.1)
        };
        for h in &tasks {
            h.abort();
        }
        for h in tasks {
            let _ = h.await;
        }
    }
}
