//! The buffer's gauges and loss counters for `/metrics`, read from the [`Registry`] at each
//! scrape so that they cannot drift from the buffer itself.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use super::registry::{Phase, Registry};

/// The buffer's state, read at each scrape.
#[derive(Debug)]
pub struct BufferCollector {
    pub buffer: Arc<Registry>,
    /// `total_limit_size`, if set.
    pub limit: Option<u64>,
}

fn encode_gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: f64,
) -> std::fmt::Result {
    let gauge = ConstGauge::new(value);
    let metric = encoder.encode_descriptor(name, help, unit, gauge.metric_type())?;
    gauge.encode(metric)
}

fn encode_counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> std::fmt::Result {
    let counter = ConstCounter::new(value);
    let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
    counter.encode(metric)
}

impl Collector for BufferCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        // Every phase is written, empty ones included, so that dashboards see zeros.
        let phases = [
            Phase::Open,
            Phase::Sealed,
            Phase::Uploading,
            Phase::Uploaded,
            Phase::Publishing,
            Phase::Published,
            Phase::Dropped,
        ];
        let (counts, oldest_ms) = self.buffer.count_by_phase(phases);
        encode_gauge(
            &mut encoder,
            "buffer",
            "Bytes of the chunks in the buffer",
            Some(&Unit::Bytes),
            self.buffer.usage() as f64,
        )?;
        encode_gauge(
            &mut encoder,
            "buffer_spare",
            "Bytes of delivered chunks' data files kept for new chunks to overwrite (they count toward total_limit_size and are deleted first)",
            Some(&Unit::Bytes),
            self.buffer.spares().bytes() as f64,
        )?;
        if let Some(limit) = self.limit {
            encode_gauge(
                &mut encoder,
                "buffer_limit",
                "total_limit_size",
                Some(&Unit::Bytes),
                limit as f64,
            )?;
        }
        let mut family = encoder.encode_descriptor(
            "buffer_chunks",
            "Chunks in the buffer, by phase",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (phase, n) in phases.into_iter().zip(counts) {
            let labels = vec![("phase".to_string(), phase_name(phase).to_string())];
            ConstGauge::new(n as i64).encode(family.encode_family(&labels)?)?;
        }
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let oldest = oldest_ms.map_or(0.0, |ms| (now_ms - ms).max(0) as f64 / 1000.0);
        encode_gauge(
            &mut encoder,
            "oldest_unpublished_chunk_age",
            "Age of the oldest chunk not yet published (0 when the buffer is empty)",
            Some(&Unit::Seconds),
            oldest,
        )?;
        let (dropped, dropped_events, dead) = self.buffer.losses();
        encode_counter(
            &mut encoder,
            "chunks_dropped",
            "Chunks deleted by overflow_action drop_oldest_chunk",
            dropped,
        )?;
        encode_counter(
            &mut encoder,
            "events_dropped",
            "Events in chunks deleted by overflow_action drop_oldest_chunk",
            dropped_events,
        )?;
        encode_counter(
            &mut encoder,
            "chunks_dead_lettered",
            "Chunks moved to the dead-letter folder",
            dead,
        )?;
        encode_counter(
            &mut encoder,
            "files_quarantined",
            "Chunk files moved to quarantine (damaged, unknown) or, for a torn tail, copied there",
            self.buffer.quarantined(),
        )?;
        encode_gauge(
            &mut encoder,
            "buffer_requests_waiting",
            "Requests received and not yet written and synced: their acks wait (while the buffer is full, every request the senders have in flight)",
            None,
            self.buffer.requests_waiting() as f64,
        )?;
        encode_gauge(
            &mut encoder,
            "ready",
            "1 while the sidecar can accept and buffer events",
            None,
            if self.buffer.not_ready_because().is_none() {
                1.0
            } else {
                0.0
            },
        )?;
        Ok(())
    }
}

fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Open => "open",
        Phase::Sealed => "sealed",
        Phase::Uploading => "uploading",
        Phase::Uploaded => "uploaded",
        Phase::Publishing => "publishing",
        Phase::Published => "published",
        Phase::Dropped => "dropped",
    }
}
