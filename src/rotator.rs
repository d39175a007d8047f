//! Rotation after erasures, coalesced: the server's background job that completes erasures.
//!
//! An erasure asks for a rotation (`request`). The rotator waits `delay` after the first
//! request, taking every request that arrives meanwhile, then rotates once: a burst of
//! erasures costs one rotation. An erasure sets `rotation_due` in the store in the same
//! commit, so a rotation that a stop or a crash kept from running is requested again at the
//! next start. On stop, a pending request is run before the thread ends.

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::audit::{Action, Entry, Outcome};
use crate::ledger::Ledger;

/// Metadata set by an erasure, cleared by the rotation that completes it.
pub const META_DUE: &str = "rotation_due";

/// Who rotations run as, in the log and the audit trail.
pub const ACTOR: &str = "pdledger";

enum Msg {
    Rotate,
    Stop,
}

pub struct Rotator {
    tx: Mutex<Sender<Msg>>,
    generation: watch::Receiver<u32>,
    join: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Rotator {
    pub fn spawn(ledger: Arc<Ledger>, delay: Duration) -> Rotator {
        let (tx, rx) = channel();
        let (gen_tx, generation) = watch::channel(ledger.key_generation());
        let due = ledger.store().meta(META_DUE).ok().flatten().is_some();
        let join = std::thread::Builder::new()
            .name("pdledger-rotator".into())
            .spawn(move || {
                // A rotation due from before this start runs first.
                let mut due = due;
                loop {
                    if !std::mem::take(&mut due) {
                        match rx.recv() {
                            Ok(Msg::Rotate) => {}
                            Ok(Msg::Stop) | Err(_) => return,
                        }
                    }
                    // Coalesce: everything that arrives within `delay` of the first request.
                    let deadline = Instant::now() + delay;
                    let mut stopping = false;
                    loop {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match rx.recv_timeout(left) {
                            Ok(Msg::Rotate) => continue,
                            Ok(Msg::Stop) | Err(RecvTimeoutError::Disconnected) => {
                                stopping = true;
                                break;
                            }
                            Err(RecvTimeoutError::Timeout) => break,
                        }
                    }
                    run(&ledger, &gen_tx);
                    if stopping {
                        return;
                    }
                }
            })
            .expect("spawn the rotator thread");
        Rotator { tx: Mutex::new(tx), generation, join: Mutex::new(Some(join)) }
    }

    /// Asks for a rotation soon (coalesced with others).
    pub fn request(&self) {
        let _ = self.tx.lock().expect("not poisoned").send(Msg::Rotate);
    }

    /// The current master-key generation, updated after each rotation this rotator runs.
    pub fn generation(&self) -> watch::Receiver<u32> {
        self.generation.clone()
    }

    /// Runs a pending rotation, then stops the thread.
    pub fn stop(&self) {
        let _ = self.tx.lock().expect("not poisoned").send(Msg::Stop);
        if let Some(j) = self.join.lock().expect("not poisoned").take() {
            let _ = j.join();
        }
    }
}

impl Drop for Rotator {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(ledger: &Ledger, generation: &watch::Sender<u32>) {
    let outcome = match ledger.rotate() {
        Ok(r) => {
            generation.send_replace(r.to);
            Outcome::Ok
        }
        Err(e) => {
            tracing::error!(error = %e, "automatic key rotation failed; erasures stay incomplete until one succeeds");
            Outcome::Failed
        }
    };
    let entry = Entry::new(Action::KeysRotated, None, outcome).into_op(ACTOR);
    if let Err(e) = ledger.submit(vec![entry]) {
        tracing::error!(error = %e, "could not audit a key rotation");
    }
}
