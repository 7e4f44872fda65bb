//! Reclaimed segment files leave the directory strictly oldest first.
//!
//! A tombstone lives in a newer segment than the record it deletes. If the
//! newer file went first (two background unlinks racing, or a recycle
//! renaming it while an older unlink is still pending), a crash in between
//! would leave the record without its tombstone, and the next open would
//! bring back a block whose removal was acknowledged. So every unlink goes
//! through one FIFO drained by one thread at a time, and a file may be
//! reused only once everything reclaimed before it is gone.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

use super::index::Segment;

/// Reclaimed segments being unlinked off the put path at most; past this,
/// the put that reclaims waits for its own unlink (back-pressure).
const MAX_BACKGROUND_UNLINKS: usize = 4;

#[derive(Debug, Default)]
pub(super) struct Unlinker {
    state: Mutex<Queue>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct Queue {
    pending: VecDeque<(u64, PathBuf, Arc<Segment>)>,
    /// The sequence number the next unlink gets (starting at 1).
    next: u64,
    /// Every unlink up to this number has finished.
    completed: u64,
    /// A thread is draining `pending`.
    draining: bool,
    /// Test hook: the drainer waits while set.
    #[cfg(test)]
    paused: bool,
}

impl Unlinker {
    /// Queues `path` for unlinking after every file queued before it.
    /// With `now`, or when too many are pending, waits until it is gone.
    /// Readers holding `seg` keep the file open.
    pub(super) fn unlink(self: &Arc<Self>, path: PathBuf, seg: Arc<Segment>, now: bool) {
        let mut q = self.state.lock();
        q.next += 1;
        let seq = q.next;
        q.pending.push_back((seq, path, seg));
        let backlog = q.pending.len() > MAX_BACKGROUND_UNLINKS;
        if !q.draining {
            q.draining = true;
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("kvtier-unlink".into())
                .spawn(move || me.drain());
            if let Err(e) = spawned {
                // Drain on this thread instead: slower, still in order.
                tracing::warn!("could not start the unlink thread: {e}");
                drop(q);
                self.drain();
                q = self.state.lock();
            }
        }
        if now || backlog {
            while q.completed < seq {
                self.done.wait(&mut q);
            }
        }
    }

    /// Waits until every file queued so far is gone: the caller is about
    /// to reuse or delete a newer one.
    pub(super) fn wait_all(&self) {
        let mut q = self.state.lock();
        while q.completed < q.next {
            self.done.wait(&mut q);
        }
    }

    fn drain(&self) {
        let mut q = self.state.lock();
        loop {
            #[cfg(test)]
            while q.paused {
                self.done.wait(&mut q);
            }
            let Some((seq, path, seg)) = q.pending.pop_front() else {
                q.draining = false;
                return;
            };
            drop(q);
            if let Err(e) = std::fs::remove_file(&path) {
                // The file stays until the next open, which indexes its
                // (valid) blocks again and enforces the capacity there.
                tracing::warn!(path = %path.display(), "could not remove reclaimed segment: {e}");
            }
            drop(seg);
            q = self.state.lock();
            q.completed = seq;
            self.done.notify_all();
        }
    }

    #[cfg(test)]
    pub(super) fn pause(&self, paused: bool) {
        self.state.lock().paused = paused;
        self.done.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::time::Duration;

    fn seg(dir: &std::path::Path, id: u64) -> (PathBuf, Arc<Segment>) {
        let path = dir.join(format!("{id}.seg"));
        let file = File::create(&path).unwrap();
        (path, Arc::new(Segment { id, file }))
    }

    #[test]
    fn a_newer_file_never_goes_before_an_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let u = Arc::new(Unlinker::default());
        u.pause(true);
        let (old, old_seg) = seg(dir.path(), 1);
        let (new, new_seg) = seg(dir.path(), 2);
        u.unlink(old.clone(), old_seg, false);
        let u2 = u.clone();
        let new2 = new.clone();
        let waiter = std::thread::spawn(move || u2.unlink(new2, new_seg, true));
        std::thread::sleep(Duration::from_millis(100));
        // The drainer is held: the immediate unlink of the newer file must
        // wait behind the older one rather than jump the queue.
        assert!(old.exists() && new.exists());
        assert!(!waiter.is_finished());
        u.pause(false);
        waiter.join().unwrap();
        assert!(!old.exists() && !new.exists());
    }

    #[test]
    fn wait_all_returns_once_every_queued_file_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let u = Arc::new(Unlinker::default());
        let paths: Vec<PathBuf> = (1..=8)
            .map(|i| {
                let (p, s) = seg(dir.path(), i);
                u.unlink(p.clone(), s, false);
                p
            })
            .collect();
        u.wait_all();
        assert!(paths.iter().all(|p| !p.exists()));
        // Nothing pending: returns at once.
        u.wait_all();
    }
}
