//! Delivery outages in the log: a few lines with counts, not one line per chunk retry.
//!
//! With S3 down and 25,000 chunks waiting, every chunk fails and is retried on its own backoff;
//! one WARN line per retry made about 14,000 lines a minute that said the same thing. Now the
//! uploader and the publisher log each retry at debug and tell their stage's [`Reporter`] about
//! every failed and successful attempt. The reporter decides what an operator reads:
//!
//! | when | level | message (upload stage; `Kinesis publishes …` for the publisher) |
//! |---|---|---|
//! | the first failure after success (or after the start) | WARN, ERROR if retrying cannot fix it | `S3 uploads failing` |
//! | every [`SUMMARY_INTERVAL`] while no attempt succeeds | WARN, ERROR if retrying cannot fix it | `S3 uploads still failing`, with the chunks waiting, the oldest one's age, the next retry, the last error and how many chunks share it |
//! | every interval in which some attempts failed and others succeeded | the same | `S3 uploads failing intermittently` |
//! | the first success after a failure that was logged | INFO | `S3 uploads recovered` |
//!
//! A stage that flaps (throttling: some attempts fail, the next succeeds) logs at most one
//! failing and one recovered line per interval: a failure within an interval of the last line
//! is left to the next summary, and its end, if nothing said it began, goes unsaid. Each
//! chunk's attempts, last error and next retry stay in the registry (`/api/v1/buffer`); a chunk
//! moved to `dead/` or `quarantine/` keeps its own ERROR line, as data that needs an operator.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{error, info, warn, Level};

use crate::aws::BackendError;

/// How often a failing stage is summarised in the log.
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(30);

/// How often delivery checks whether a summary is due.
pub const TICK: Duration = Duration::from_secs(1);

/// A delivery stage, failing or not as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Chunk bodies to S3 (the uploader).
    Upload,
    /// Pointers to Kinesis (the publisher).
    Publish,
}

impl Stage {
    pub const ALL: [Stage; 2] = [Stage::Upload, Stage::Publish];

    /// The `stage` field of its lines, as in `claimcheck_retries_total{stage}`.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Upload => "upload",
            Stage::Publish => "publish",
        }
    }
}

/// One failed attempt, as much of it as the log needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The service's error code (`AccessDenied`, `ProvisionedThroughputExceededException`), a
    /// transport class (`dispatch`, `timeout`) or what failed locally (`read`, `body`, `state`).
    pub code: String,
    /// The whole error, as the chunk's `last_error` in the registry has it.
    pub cause: String,
    /// False when retrying alone will not fix it (credentials, permissions, a missing bucket).
    pub retryable: bool,
}

impl From<&BackendError> for Failure {
    fn from(e: &BackendError) -> Failure {
        Failure {
            code: e.code.clone(),
            cause: e.to_string(),
            retryable: e.retryable,
        }
    }
}

impl Failure {
    /// A record that Kinesis refused inside a successful PutRecords.
    pub fn record(code: &str, message: &str) -> Failure {
        Failure {
            code: code.into(),
            cause: format!("{code}: {message}"),
            retryable: !crate::aws::needs_operator(code),
        }
    }
}

/// What waits at a stage, read from the registry for a summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    /// Chunks at this stage: waiting for their first attempt or for a retry, or in flight.
    pub waiting: usize,
    /// Of them, those that failed and wait for their next attempt.
    pub retrying: usize,
    /// Of those, the ones whose last error is the summary's.
    pub with_last_error: usize,
    /// Age of the oldest chunk waiting.
    pub oldest: Option<Duration>,
    /// When the next retry is due (zero when one is overdue, waiting for a worker).
    pub next_retry_in: Option<Duration>,
}

/// A line to log.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// The first failure after success, or after the start.
    Failing(Failure),
    /// The stage still fails, or failed now and then, since the last line.
    Summary(Summary),
    /// The first success after a failure that was logged.
    Recovered {
        /// From the first failure of the outage to this success.
        after: Duration,
        /// Attempts that failed during the outage.
        failed_attempts: u64,
        /// Chunks whose first attempt at this stage failed during the outage (each is retried).
        chunks: u64,
    },
}

/// The periodic line of a failing stage.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// How long every attempt has failed; `None` when some also succeeded since the last line.
    pub failing_for: Option<Duration>,
    /// Attempts that failed since the last line.
    pub failed: u64,
    /// Chunks delivered since the last line.
    pub succeeded: u64,
    /// The most recent failure.
    pub last_error: Failure,
    /// Some failure since the last line, or the last one, will not heal by retrying.
    pub needs_attention: bool,
    pub backlog: Backlog,
}

impl Report {
    /// WARN while retrying may fix it, ERROR when an operator must act, INFO for recovery.
    pub fn level(&self) -> Level {
        match self {
            Report::Failing(f) if !f.retryable => Level::ERROR,
            Report::Summary(s) if s.needs_attention => Level::ERROR,
            Report::Failing(_) | Report::Summary(_) => Level::WARN,
            Report::Recovered { .. } => Level::INFO,
        }
    }

    /// Writes the line for `stage`.
    pub fn log(&self, stage: Stage) {
        let level = self.level();
        let name = stage.name();
        match (self, stage) {
            (Report::Failing(f), Stage::Upload) => failing(level, name, "S3 uploads failing", f),
            (Report::Failing(f), Stage::Publish) => {
                failing(level, name, "Kinesis publishes failing", f)
            }
            (Report::Summary(s), Stage::Upload) => summary(
                level,
                name,
                if s.failing_for.is_some() {
                    "S3 uploads still failing"
                } else {
                    "S3 uploads failing intermittently"
                },
                s,
            ),
            (Report::Summary(s), Stage::Publish) => summary(
                level,
                name,
                if s.failing_for.is_some() {
                    "Kinesis publishes still failing"
                } else {
                    "Kinesis publishes failing intermittently"
                },
                s,
            ),
            (
                Report::Recovered {
                    after,
                    failed_attempts,
                    chunks,
                },
                _,
            ) => {
                let message = match stage {
                    Stage::Upload => "S3 uploads recovered",
                    Stage::Publish => "Kinesis publishes recovered",
                };
                info!(parent: None, stage = %name, after = %approx(*after), failed_attempts, chunks_retried = chunks, "{message}");
            }
        }
    }
}

/// Logs at `level`, which is WARN or ERROR here. The line is about the stage, not about the
/// chunk whose attempt triggered it: no span.
macro_rules! warn_or_error {
    ($level:expr, $($rest:tt)+) => {
        if $level == Level::ERROR {
            error!(parent: None, $($rest)+)
        } else {
            warn!(parent: None, $($rest)+)
        }
    };
}

fn failing(level: Level, stage: &str, message: &str, f: &Failure) {
    let attention = attention(!f.retryable);
    warn_or_error!(level, %stage, code = %f.code, cause = %f.cause, "{message}; chunks stay in the buffer and are retried{attention}");
}

fn summary(level: Level, stage: &str, message: &str, s: &Summary) {
    let b = &s.backlog;
    let attention = attention(s.needs_attention);
    let approx = |d: Option<Duration>| d.map(|d| tracing::field::display(approx(d)));
    warn_or_error!(level, %stage,
        failing_for = approx(s.failing_for),
        waiting = b.waiting,
        retrying = b.retrying,
        oldest = approx(b.oldest),
        next_retry_in = approx(b.next_retry_in),
        failed = s.failed,
        succeeded = s.succeeded,
        code = %s.last_error.code,
        cause = %s.last_error.cause,
        chunks_with_cause = b.with_last_error,
        "{message}{attention}");
}

fn attention(needed: bool) -> &'static str {
    if needed {
        "; this needs an operator: retrying alone will not fix it"
    } else {
        ""
    }
}

/// `850ms`, `4.2s`, `12m34s`, `2h5m`: for reading, not for parsing.
fn approx(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    if d < Duration::from_secs(10) {
        return format!("{:.1}s", d.as_secs_f64());
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m"),
    }
}

/// The reporting state of one stage. Time comes in as `now`, so that tests drive it without a
/// clock; [`Reporter`] supplies the real one.
#[derive(Debug)]
pub struct Outage {
    interval: Duration,
    /// Set while no attempt has succeeded since a failure.
    failing: Option<Failing>,
    /// The most recent failure.
    last: Option<Failure>,
    /// Since the last line: failed attempts, chunks delivered, and whether a failure needed an
    /// operator.
    failed: u64,
    succeeded: u64,
    needs_attention: bool,
    /// When the last line was logged.
    last_line: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Failing {
    since: Instant,
    /// A line said that the stage fails: its recovery is said too.
    announced: bool,
    failed_attempts: u64,
    chunks: u64,
}

impl Outage {
    /// A stage that is not failing, summarised every `interval` when it does.
    pub fn new(interval: Duration) -> Outage {
        Outage {
            interval,
            failing: None,
            last: None,
            failed: 0,
            succeeded: 0,
            needs_attention: false,
            last_line: None,
        }
    }

    /// An attempt failed; `first` when it was the chunk's first attempt at this stage.
    pub fn failed(&mut self, now: Instant, failure: Failure, first: bool) -> Option<Report> {
        // Said at once only after calm: no line for an interval and no failure left unsaid.
        // Otherwise (a stage that flaps) the next summary counts it.
        let calm = self.failed == 0 && self.quiet(now);
        self.failed += 1;
        self.needs_attention |= !failure.retryable;
        let failing = self.failing.get_or_insert(Failing {
            since: now,
            announced: false,
            failed_attempts: 0,
            chunks: 0,
        });
        failing.failed_attempts += 1;
        failing.chunks += u64::from(first);
        let announce = calm && !failing.announced;
        if announce {
            failing.announced = true;
        }
        self.last = Some(failure);
        if !announce {
            return None;
        }
        self.said(now);
        self.last.clone().map(Report::Failing)
    }

    /// `chunks` were delivered.
    pub fn succeeded(&mut self, now: Instant, chunks: u64) -> Option<Report> {
        self.succeeded += chunks;
        let failing = self.failing.take()?;
        if !failing.announced {
            // Nothing said it began; the next summary counts its failures.
            return None;
        }
        self.said(now);
        Some(Report::Recovered {
            after: now.saturating_duration_since(failing.since),
            failed_attempts: failing.failed_attempts,
            chunks: failing.chunks,
        })
    }

    /// True when a summary would be logged now (then read the [`Backlog`] and call
    /// [`Outage::summarize`]).
    pub fn summary_due(&self, now: Instant) -> bool {
        (self.failing.is_some() || self.failed > 0) && self.quiet(now)
    }

    /// The most recent failure's cause, for [`Backlog::with_last_error`].
    pub fn last_cause(&self) -> Option<&str> {
        self.last.as_ref().map(|f| f.cause.as_str())
    }

    /// The periodic summary, if one is due.
    pub fn summarize(&mut self, now: Instant, backlog: Backlog) -> Option<Report> {
        if !self.summary_due(now) {
            return None;
        }
        let last_error = self.last.clone()?;
        // "Still failing" only if nothing succeeded since the last line; else intermittent.
        let still = self.failing.filter(|_| self.succeeded == 0);
        let summary = Summary {
            failing_for: still.map(|f| now.saturating_duration_since(f.since)),
            failed: self.failed,
            succeeded: self.succeeded,
            needs_attention: self.needs_attention || !last_error.retryable,
            last_error,
            backlog,
        };
        if backlog.waiting == 0 {
            // Nothing is left to retry (dead-lettered, dropped, each with its own line): no
            // success will come to end this outage, so it ends here, without a recovery line.
            self.failing = None;
        } else if let (Some(f), Some(_)) = (&mut self.failing, still) {
            f.announced = true;
        }
        self.said(now);
        Some(Report::Summary(summary))
    }

    /// No line for an interval.
    fn quiet(&self, now: Instant) -> bool {
        self.last_line
            .is_none_or(|t| now.saturating_duration_since(t) >= self.interval)
    }

    /// A line was logged: the counts start again.
    fn said(&mut self, now: Instant) {
        self.last_line = Some(now);
        self.failed = 0;
        self.succeeded = 0;
        self.needs_attention = false;
    }
}

/// One stage's [`Outage`] on the real clock, logging what it decides. Shared by the stage's
/// workers through the buffer's registry.
#[derive(Debug)]
pub struct Reporter {
    stage: Stage,
    outage: Mutex<Outage>,
}

impl Reporter {
    pub fn new(stage: Stage) -> Reporter {
        Reporter {
            stage,
            outage: Mutex::new(Outage::new(SUMMARY_INTERVAL)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outage> {
        // Plain values: a panic elsewhere leaves nothing half-changed that matters.
        self.outage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A chunk's attempt failed and will be retried; `attempt` counts its failures here.
    pub fn failed(&self, failure: Failure, attempt: u32) {
        let report = self.lock().failed(Instant::now(), failure, attempt == 1);
        if let Some(r) = report {
            r.log(self.stage);
        }
    }

    /// `chunks` were delivered by this stage.
    pub fn succeeded(&self, chunks: u64) {
        let report = self.lock().succeeded(Instant::now(), chunks);
        if let Some(r) = report {
            r.log(self.stage);
        }
    }

    /// Logs the summary if one is due, with the backlog that `backlog` reads (from the
    /// registry) for the last error.
    pub fn summarize(&self, backlog: impl FnOnce(Option<&str>) -> Backlog) {
        let now = Instant::now();
        let cause = {
            let outage = self.lock();
            if !outage.summary_due(now) {
                return;
            }
            outage.last_cause().map(str::to_string)
        };
        let backlog = backlog(cause.as_deref());
        let report = self.lock().summarize(now, backlog);
        if let Some(r) = report {
            r.log(self.stage);
        }
    }
}

/// The reporters of both stages.
#[derive(Debug)]
pub struct Reporters {
    upload: Reporter,
    publish: Reporter,
}

impl Default for Reporters {
    fn default() -> Reporters {
        Reporters {
            upload: Reporter::new(Stage::Upload),
            publish: Reporter::new(Stage::Publish),
        }
    }
}

impl Reporters {
    pub fn get(&self, stage: Stage) -> &Reporter {
        match stage {
            Stage::Upload => &self.upload,
            Stage::Publish => &self.publish,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uploader::UploadError;

    const INTERVAL: Duration = Duration::from_secs(30);

    fn down() -> Failure {
        Failure {
            code: "dispatch".into(),
            cause: "PutObject failed (dispatch): connection refused".into(),
            retryable: true,
        }
    }

    fn denied() -> Failure {
        Failure {
            code: "AccessDenied".into(),
            cause: "PutObject failed (AccessDenied): Access Denied".into(),
            retryable: false,
        }
    }

    fn backlog(waiting: usize) -> Backlog {
        Backlog {
            waiting,
            retrying: waiting,
            with_last_error: waiting,
            oldest: Some(Duration::from_secs(90)),
            next_retry_in: Some(Duration::from_millis(400)),
        }
    }

    /// A clock that only moves when told: `at(s)` is `s` seconds after the start.
    struct Clock(Instant);

    impl Clock {
        fn new() -> Clock {
            Clock(Instant::now())
        }
        fn at(&self, secs: f64) -> Instant {
            self.0 + Duration::from_secs_f64(secs)
        }
    }

    #[test]
    fn an_outage_is_one_line_then_a_summary_per_interval_then_one_recovery() {
        let t = Clock::new();
        let mut o = Outage::new(INTERVAL);
        assert_eq!(o.succeeded(t.at(0.0), 3), None, "success says nothing");
        assert!(!o.summary_due(t.at(100.0)));

        assert_eq!(
            o.failed(t.at(1.0), down(), true),
            Some(Report::Failing(down()))
        );
        // Thousands of chunks fail and fail again: nothing more until the interval is over.
        for i in 0..10_000u32 {
            let now = t.at(1.0 + f64::from(i) * 0.002);
            assert_eq!(o.failed(now, down(), i < 5_000), None);
        }
        assert!(!o.summary_due(t.at(30.9)));
        assert_eq!(o.summarize(t.at(30.9), backlog(5_000)), None);
        assert!(o.summary_due(t.at(31.0)));
        let Some(Report::Summary(s)) = o.summarize(t.at(31.0), backlog(5_000)) else {
            panic!("a summary is due");
        };
        assert_eq!(s.failing_for, Some(Duration::from_secs(30)));
        assert_eq!((s.failed, s.succeeded), (10_000, 0));
        assert_eq!(s.last_error, down());
        assert!(!s.needs_attention);
        assert_eq!(s.backlog, backlog(5_000));
        assert_eq!(Report::Summary(s).level(), Level::WARN);

        // The next interval's summary counts only its own attempts.
        o.failed(t.at(40.0), down(), false);
        assert!(!o.summary_due(t.at(60.0)));
        let Some(Report::Summary(s)) = o.summarize(t.at(61.0), backlog(4_000)) else {
            panic!("a summary is due");
        };
        assert_eq!(
            (s.failing_for, s.failed),
            (Some(Duration::from_secs(60)), 1)
        );

        // Still failing with no attempt in an interval (long backoff): still summarised.
        assert!(matches!(
            o.summarize(t.at(91.0), backlog(4_000)),
            Some(Report::Summary(Summary { failed: 0, .. }))
        ));

        let recovered = o.succeeded(t.at(95.5), 1);
        assert_eq!(
            recovered,
            Some(Report::Recovered {
                after: Duration::from_secs_f64(94.5),
                failed_attempts: 10_002,
                chunks: 5_001,
            })
        );
        assert_eq!(recovered.unwrap().level(), Level::INFO);
        assert_eq!(o.succeeded(t.at(96.0), 1), None, "recovery is said once");
        assert!(!o.summary_due(t.at(200.0)), "healthy: no more summaries");
    }

    #[test]
    fn errors_that_retrying_cannot_fix_are_errors_but_still_not_one_per_chunk() {
        let t = Clock::new();
        let mut o = Outage::new(INTERVAL);
        let first = o.failed(t.at(0.0), denied(), true).unwrap();
        assert_eq!(first, Report::Failing(denied()));
        assert_eq!(first.level(), Level::ERROR);
        for i in 0..1_000 {
            assert_eq!(o.failed(t.at(1.0), denied(), i == 0), None);
        }
        let summary = o.summarize(t.at(30.0), backlog(1_000)).unwrap();
        assert_eq!(summary.level(), Level::ERROR);

        // A stage that began with a retryable error and then lost its permissions: the next
        // summary is an ERROR, even if the last failure is retryable again.
        let mut o = Outage::new(INTERVAL);
        assert_eq!(
            o.failed(t.at(0.0), down(), true).unwrap().level(),
            Level::WARN
        );
        o.failed(t.at(5.0), denied(), false);
        o.failed(t.at(6.0), down(), false);
        let Some(Report::Summary(s)) = o.summarize(t.at(30.0), backlog(10)) else {
            panic!("a summary is due");
        };
        assert!(s.needs_attention);
        assert_eq!(s.last_error, down());
        assert!(
            !matches!(o.summarize(t.at(60.0), backlog(10)), Some(Report::Summary(s)) if s.needs_attention),
            "once said, a retryable error alone is a WARN again"
        );
    }

    #[test]
    fn a_flapping_stage_logs_at_most_two_lines_per_interval() {
        let t = Clock::new();
        let mut o = Outage::new(INTERVAL);
        let mut lines = Vec::new();
        // Ten minutes of throttling: every 100 ms one attempt fails and the next succeeds, and
        // the summary task looks every second.
        for tenth in 0..6_000u32 {
            let now = t.at(f64::from(tenth) / 10.0);
            let report = if tenth % 2 == 0 {
                o.failed(now, down(), true)
            } else {
                o.succeeded(now, 1)
            };
            lines.extend(report.map(|r| (tenth, r)));
            if tenth % 10 == 0 && o.summary_due(now) {
                lines.extend(o.summarize(now, backlog(3)).map(|r| (tenth, r)));
            }
        }
        let warnings = lines
            .iter()
            .filter(|(_, r)| r.level() != Level::INFO)
            .count();
        // 600 s / 30 s = 20 intervals: one failing line at the start, then one line (a summary
        // or a failing line) and one recovery at most per interval.
        assert!(warnings <= 21, "{warnings} warnings: {lines:#?}");
        assert!(lines.len() <= 42, "{} lines: {lines:#?}", lines.len());
        assert!(
            warnings >= 19,
            "the failures are still reported every interval"
        );
        let intermittent = lines.iter().any(|(_, r)| {
            matches!(r, Report::Summary(Summary { failing_for: None, failed, succeeded, .. }) if *failed > 0 && *succeeded > 0)
        });
        assert!(
            intermittent,
            "a summary counts failures between successes: {lines:#?}"
        );
    }

    #[test]
    fn a_short_failure_between_lines_is_left_to_the_summary() {
        let t = Clock::new();
        let mut o = Outage::new(INTERVAL);
        o.failed(t.at(0.0), down(), true).unwrap();
        o.succeeded(t.at(1.0), 1).unwrap();
        // Fails again within the interval of the last line: not said at once, and its end is
        // not said either.
        assert_eq!(o.failed(t.at(2.0), down(), true), None);
        assert_eq!(o.succeeded(t.at(3.0), 4), None);
        let Some(Report::Summary(s)) = o.summarize(t.at(31.0), backlog(0)) else {
            panic!("the failure is summarised");
        };
        assert_eq!((s.failing_for, s.failed, s.succeeded), (None, 1, 4));
        assert!(!o.summary_due(t.at(90.0)), "nothing since");
    }

    #[test]
    fn a_failure_with_nothing_left_waiting_is_summarised_once() {
        let t = Clock::new();
        let mut o = Outage::new(INTERVAL);
        o.failed(t.at(0.0), down(), true).unwrap();
        o.failed(t.at(10.0), down(), false);
        // The chunk went to dead/ (its own ERROR line): no success will come.
        let summary = o.summarize(t.at(30.0), backlog(0));
        assert!(
            matches!(
                summary,
                Some(Report::Summary(Summary {
                    failing_for: Some(_),
                    failed: 1,
                    ..
                }))
            ),
            "{summary:?}"
        );
        assert!(!o.summary_due(t.at(60.0)));
        assert_eq!(o.succeeded(t.at(61.0), 1), None);
        assert_eq!(
            o.failed(t.at(62.0), down(), true),
            Some(Report::Failing(down())),
            "a new outage is said again"
        );
    }

    #[test]
    fn failures_are_classified_for_the_log() {
        let throttled = Failure::record("ProvisionedThroughputExceededException", "slow down");
        assert!(throttled.retryable);
        assert_eq!(
            throttled.cause,
            "ProvisionedThroughputExceededException: slow down"
        );
        assert!(!Failure::record("KMSAccessDeniedException", "no").retryable);
        let e = UploadError::Store(BackendError {
            operation: "PutObject",
            code: "NoSuchBucket".into(),
            message: "gone".into(),
            retryable: false,
        });
        let f = Failure::from(&e);
        assert_eq!(
            (f.code.as_str(), f.cause.as_str(), f.retryable),
            (
                "NoSuchBucket",
                "PutObject failed (NoSuchBucket): gone",
                false
            )
        );
        let f = Failure::from(&UploadError::State(std::io::Error::other("disk")));
        assert_eq!((f.code.as_str(), f.retryable), ("state", true));
    }

    #[test]
    fn durations_read_well() {
        let cases = [
            (Duration::from_millis(850), "850ms"),
            (Duration::from_millis(4_240), "4.2s"),
            (Duration::from_secs(42), "42s"),
            (Duration::from_secs(754), "12m34s"),
            (Duration::from_secs(7_530), "2h5m"),
        ];
        for (d, text) in cases {
            assert_eq!(approx(d), text);
        }
    }
}
