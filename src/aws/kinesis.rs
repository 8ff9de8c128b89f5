//! Pointer records to Kinesis with PutRecords.
//!
//! <https://docs.aws.amazon.com/kinesis/latest/APIReference/API_PutRecords.html>: up to 500
//! records and 5 MiB per request (data plus partition keys); a 200 response can still carry
//! per-record failures (`ProvisionedThroughputExceededException`, `InternalFailure`), which the
//! publisher retries alone.

use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};

use super::{timed, BackendError};
use crate::backends::{EntryResult, PointerRecord, PointerSink};

#[derive(Debug, Clone)]
pub struct KinesisSink {
    client: aws_sdk_kinesis::Client,
    /// A stream name, or a stream ARN (`arn:aws:kinesis:…`).
    stream: String,
}

impl KinesisSink {
    pub fn new(client: aws_sdk_kinesis::Client, stream: String) -> Self {
        KinesisSink { client, stream }
    }

    /// The stream's name or ARN.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The stream's status (DescribeStreamSummary), for the start-up check.
    pub async fn status(&self) -> Result<StreamStatus, BackendError> {
        let req = self.client.describe_stream_summary();
        let req = if self.stream.starts_with("arn:") {
            req.stream_arn(&self.stream)
        } else {
            req.stream_name(&self.stream)
        };
        let out = timed(true, "DescribeStreamSummary", req.send()).await?;
        out.stream_description_summary
            .map(|s| s.stream_status)
            .ok_or_else(|| {
                BackendError::local("DescribeStreamSummary", "no stream in the response")
            })
    }
}

impl PointerSink for KinesisSink {
    async fn put_records(
        &self,
        records: &[PointerRecord],
    ) -> Result<Vec<EntryResult>, BackendError> {
        let entries = records
            .iter()
            .map(|r| {
                PutRecordsRequestEntry::builder()
                    .data(Blob::new(r.data.clone()))
                    .partition_key(&r.partition_key)
                    .build()
                    .map_err(|e| BackendError::local("PutRecords", e))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let req = self.client.put_records().set_records(Some(entries));
        let req = if self.stream.starts_with("arn:") {
            req.stream_arn(&self.stream)
        } else {
            req.stream_name(&self.stream)
        };
        let out = timed(true, "PutRecords", req.send()).await?;
        if out.records.len() != records.len() {
            return Err(BackendError::local(
                "PutRecords",
                format!(
                    "{} results for {} records",
                    out.records.len(),
                    records.len()
                ),
            ));
        }
        Ok(out
            .records
            .into_iter()
            .map(|r| match r.error_code {
                Some(code) => EntryResult::Failed {
                    code,
                    message: r.error_message.unwrap_or_default(),
                },
                None => EntryResult::Accepted {
                    shard_id: r.shard_id.unwrap_or_default(),
                    sequence_number: r.sequence_number.unwrap_or_default(),
                },
            })
            .collect())
    }
}
