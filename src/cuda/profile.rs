//! Device time per kernel and per GEMM shape (`bench train|embed --profile`): an event before and after
//! every launch on the compute stream, summed by name. It tells a performance engineer where an update's or
//! a batch's time goes on a machine without Nsight Systems, which the lent GPU machines do not promise.
//!
//! An interval runs from the moment the device reaches the start event to the moment it reaches the end
//! event. Where the host queues work faster than the device runs it (the training step at `pch-base` from
//! B ≈ 64 on), that is the launch's own time; where the device waits for the host, the wait falls inside
//! the next interval. Events cannot time the launches inside a CUDA graph replay, so a profile is taken
//! with graphs off.

use anyhow::{Context, Result};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, sys};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Whether launches are timed, and their events since the last [`Profiler::take`]. One per [`super::Gpu`],
/// shared with its cuBLAS handle.
#[derive(Clone, Default)]
pub struct Profiler(Arc<Mutex<Option<Recording>>>);

struct Recording {
    ctx: Arc<CudaContext>,
    /// Reused from one `take` to the next: launch i uses events 2i and 2i + 1.
    events: Vec<CudaEvent>,
    launches: Vec<(String, f64)>,
}

/// One timed launch.
#[derive(Clone, Debug, PartialEq)]
pub struct Timed {
    /// The kernel's name, or `gemm <what> M×N×K` for a cuBLAS GEMM.
    pub label: String,
    /// Its floating-point operations where known (GEMMs: 2·M·N·K), else 0.
    pub flops: f64,
    pub ms: f64,
}

impl Profiler {
    fn lock(&self) -> MutexGuard<'_, Option<Recording>> {
        // A panic while the lock was held leaves nothing half-written that matters here.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Times every launch from now on, until [`Self::stop`].
    pub fn start(&self, ctx: &Arc<CudaContext>) {
        *self.lock() = Some(Recording { ctx: ctx.clone(), events: Vec::new(), launches: Vec::new() });
    }

    pub fn stop(&self) {
        *self.lock() = None;
    }

    /// Runs `launch`, which queues one piece of work on `stream`, between two events when timing is on.
    pub(crate) fn time<T>(
        &self,
        stream: &CudaStream,
        label: impl FnOnce() -> String,
        flops: f64,
        launch: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let mut guard = self.lock();
        let Some(rec) = guard.as_mut() else {
            drop(guard);
            return launch();
        };
        let first = 2 * rec.launches.len();
        while rec.events.len() < first + 2 {
            rec.events.push(rec.ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?);
        }
        rec.events[first].record(stream)?;
        let out = launch()?;
        rec.events[first + 1].record(stream)?;
        rec.launches.push((label(), flops));
        Ok(out)
    }

    /// Runs `work(i)` for i < `units` with timing on (only meanwhile), and sums each unit's launches:
    /// [`ProfileSummary::to_json`] of them per `unit`, beside `measured_ms`.
    pub fn profile_units(
        &self,
        ctx: &Arc<CudaContext>,
        unit: &str,
        units: usize,
        measured_ms: f64,
        mut work: impl FnMut(usize) -> Result<()>,
    ) -> Result<Value> {
        self.start(ctx);
        let mut summary = ProfileSummary::default();
        let timed = (0..units).try_for_each(|i| {
            work(i)?;
            summary.add_unit(self.take()?);
            Ok(())
        });
        self.stop();
        timed.map(|()| summary.to_json(unit, measured_ms))
    }

    /// The launches timed since the last call, in order, once the stream they ran on has been synchronised;
    /// the events are kept for the next ones.
    pub fn take(&self) -> Result<Vec<Timed>> {
        let mut guard = self.lock();
        let Some(rec) = guard.as_mut() else { return Ok(Vec::new()) };
        let launches = std::mem::take(&mut rec.launches);
        launches
            .into_iter()
            .enumerate()
            .map(|(i, (label, flops))| {
                let ms =
                    rec.events[2 * i].elapsed_ms(&rec.events[2 * i + 1]).with_context(|| format!("timing {label}"))?;
                Ok(Timed { label, flops, ms: ms as f64 })
            })
            .collect()
    }
}

/// Timed launches summed by label over a number of units of work (training updates, embedding batches).
#[derive(Default)]
pub struct ProfileSummary {
    units: usize,
    /// label → (calls, milliseconds, flops)
    totals: BTreeMap<String, (usize, f64, f64)>,
}

impl ProfileSummary {
    /// Adds one unit's launches.
    pub fn add_unit(&mut self, launches: Vec<Timed>) {
        self.units += 1;
        for t in launches {
            let entry = self.totals.entry(t.label).or_default();
            *entry = (entry.0 + 1, entry.1 + t.ms, entry.2 + t.flops);
        }
    }

    /// Per `unit` ("update", "batch"), the longest first: each label's calls, milliseconds, share of the
    /// profiled time and, for GEMMs, TFLOP/s; with the profiled total beside `measured_ms`, the unit's time
    /// when the benchmark timed it: the check that the intervals cover the work.
    pub fn to_json(&self, unit: &str, measured_ms: f64) -> Value {
        let per = self.units.max(1) as f64;
        let total: f64 = self.totals.values().map(|e| e.1).sum::<f64>() / per;
        let mut rows: Vec<(&String, &(usize, f64, f64))> = self.totals.iter().collect();
        rows.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
        let launches: Vec<Value> = rows
            .into_iter()
            .map(|(label, &(calls, ms, flops))| {
                json!({
                    "name": label,
                    "calls": calls as f64 / per,
                    "ms": ms / per,
                    "share": if total > 0.0 { ms / per / total } else { 0.0 },
                    "tflops": (flops > 0.0 && ms > 0.0).then(|| flops / (ms * 1e9)),
                })
            })
            .collect();
        json!({
            "per": unit,
            "units": self.units,
            "profiled_ms": total,
            "measured_ms": measured_ms,
            "launches": launches,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_sums_by_label_per_update_longest_first() {
        let mut s = ProfileSummary::default();
        for _ in 0..2 {
            s.add_unit(vec![
                Timed { label: "layernorm_fwd".into(), flops: 0.0, ms: 0.5 },
                Timed { label: "gemm a_bt 64×64×64".into(), flops: 2e9, ms: 1.0 },
                Timed { label: "layernorm_fwd".into(), flops: 0.0, ms: 0.5 },
            ]);
        }
        let v = s.to_json("update", 2.5);
        assert_eq!((v["per"].as_str(), v["units"].as_u64()), (Some("update"), Some(2)));
        assert_eq!((v["profiled_ms"].as_f64(), v["measured_ms"].as_f64()), (Some(2.0), Some(2.5)));
        let rows = v["launches"].as_array().unwrap();
        assert_eq!(rows[0]["name"], "gemm a_bt 64×64×64");
        assert_eq!(rows[0]["tflops"], 2.0);
        assert_eq!((rows[1]["calls"].as_f64(), rows[1]["ms"].as_f64()), (Some(2.0), Some(1.0)));
        assert_eq!(rows[1]["share"], 0.5);
        assert!(rows[1]["tflops"].is_null());
    }
}
