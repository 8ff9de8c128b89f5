//! A checkpoint in a DynamoDB table (feature `dynamodb`).

use std::collections::HashMap;
use std::sync::Mutex;

use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};

use super::{Checkpoint, CheckpointStore};
use crate::Error;

/// The table's partition key: the checkpoint's name.
const KEY: &str = "name";

fn dynamodb_err<E: std::error::Error + Send + Sync + 'static>(
    operation: &'static str,
) -> impl FnOnce(E) -> Error {
    move |e| Error::DynamoDb {
        operation,
        source: Box::new(e),
    }
}

/// A checkpoint kept as one item of a DynamoDB table whose partition key is the string
/// attribute `name` ([`DynamoDbCheckpointStore::create_table`] makes such a table).
///
/// The item is `{"name": S, "checkpoint": S (the JSON document), "version": N}`. Every save is
/// conditional on the version this store loaded or last saved, so that a second reader using
/// the same name gets an [`Error::Checkpoint`] instead of silently overwriting the first
/// one's progress. A save whose answers were all lost though it landed is recognised as its
/// own at the next save, not taken for another reader's. A checkpoint with the default dedup
/// window (10 000 ids) takes about 230 KB of the item's 400 KB limit; windows above about
/// 16 000 ids do not fit.
///
/// Needs `dynamodb:GetItem` and `dynamodb:PutItem` on the table.
///
/// ```no_run
/// # async fn run() -> Result<(), claimcheck_consumer::Error> {
/// use claimcheck_consumer::checkpoint::DynamoDbCheckpointStore;
/// use claimcheck_consumer::{Resolver, StreamReader};
///
/// let config = aws_config::load_from_env().await;
/// let store = DynamoDbCheckpointStore::new(
///     aws_sdk_dynamodb::Client::new(&config),
///     "claimcheck-checkpoints",
///     "billing-export",
/// );
/// let reader = StreamReader::builder(
///     aws_sdk_kinesis::Client::new(&config),
///     Resolver::new(aws_sdk_s3::Client::new(&config)),
///     "pointers",
/// )
/// .checkpoints(store)
/// .open()
/// .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct DynamoDbCheckpointStore {
    client: aws_sdk_dynamodb::Client,
    table: String,
    name: String,
    /// The version of the item as last loaded or saved; `None` when there was no item.
    version: Mutex<Option<u64>>,
    /// The last save that failed other than on its condition (its answers lost, say), at the
    /// version it was written for: it may have landed all the same.
    unsure: Mutex<Option<(u64, String)>>,
}

impl DynamoDbCheckpointStore {
    /// The checkpoint called `name` in `table`.
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        table: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        DynamoDbCheckpointStore {
            client,
            table: table.into(),
            name: name.into(),
            version: Mutex::new(None),
            unsure: Mutex::new(None),
        }
    }

    /// Creates a table for checkpoints (on-demand capacity) and waits until it is active.
    pub async fn create_table(client: &aws_sdk_dynamodb::Client, table: &str) -> Result<(), Error> {
        let attribute = AttributeDefinition::builder()
            .attribute_name(KEY)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .map_err(dynamodb_err("CreateTable"))?;
        let key = KeySchemaElement::builder()
            .attribute_name(KEY)
            .key_type(KeyType::Hash)
            .build()
            .map_err(dynamodb_err("CreateTable"))?;
        client
            .create_table()
            .table_name(table)
            .attribute_definitions(attribute)
            .key_schema(key)
            .billing_mode(BillingMode::PayPerRequest)
            .send()
            .await
            .map_err(dynamodb_err("CreateTable"))?;
        loop {
            let out = client
                .describe_table()
                .table_name(table)
                .send()
                .await
                .map_err(dynamodb_err("DescribeTable"))?;
            let status = out.table.and_then(|t| t.table_status);
            if status.is_some_and(|s| s.as_str() == "ACTIVE") {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    }
}

impl CheckpointStore for DynamoDbCheckpointStore {
    async fn load(&self) -> Result<Option<Checkpoint>, Error> {
        // What is loaded is what is stored: nothing earlier to be unsure of.
        *self.unsure.lock().expect("not poisoned") = None;
        let Some(item) = self.item().await? else {
            *self.version.lock().expect("not poisoned") = None;
            return Ok(None);
        };
        let field = |name: &str| Error::Checkpoint {
            reason: format!("item {:?} in {} has no {name}", self.name, self.table),
            source: None,
        };
        let json = item
            .get("checkpoint")
            .and_then(|v| v.as_s().ok())
            .ok_or_else(|| field("checkpoint string"))?;
        let version = item
            .get("version")
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| field("version number"))?;
        let checkpoint = Checkpoint::from_json(json.as_bytes())?;
        *self.version.lock().expect("not poisoned") = Some(version);
        Ok(Some(checkpoint))
    }

    async fn save(&self, checkpoint: &Checkpoint) -> Result<(), Error> {
        // Once more after taking up an earlier save that landed (which happens once: that
        // save is forgotten then), from the version it wrote.
        loop {
            if let Put::Saved = self.put(checkpoint).await? {
                return Ok(());
            }
        }
    }
}

/// What [`DynamoDbCheckpointStore::put`] did.
enum Put {
    Saved,
    /// Not saved: an earlier save whose answer was lost had landed; the store goes on from it.
    EarlierLanded,
}

impl DynamoDbCheckpointStore {
    /// Writes `checkpoint` at the next version, if the item is still at the version this
    /// store loaded or last saved.
    async fn put(&self, checkpoint: &Checkpoint) -> Result<Put, Error> {
        let loaded = *self.version.lock().expect("not poisoned");
        let next = loaded.map_or(1, |v| v + 1);
        let json = String::from_utf8(checkpoint.to_json()).expect("JSON is UTF-8");
        let req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(KEY, AttributeValue::S(self.name.clone()))
            .item("checkpoint", AttributeValue::S(json.clone()))
            .item("version", AttributeValue::N(next.to_string()));
        let req = match loaded {
            None => req
                .condition_expression("attribute_not_exists(#key)")
                .expression_attribute_names("#key", KEY),
            Some(v) => req
                .condition_expression("#version = :version")
                .expression_attribute_names("#version", "version")
                .expression_attribute_values(":version", AttributeValue::N(v.to_string())),
        };
        match req.send().await {
            Ok(_) => {
                *self.version.lock().expect("not poisoned") = Some(next);
                *self.unsure.lock().expect("not poisoned") = None;
                Ok(Put::Saved)
            }
            Err(e)
                if matches!(
                    e.as_service_error(),
                    Some(PutItemError::ConditionalCheckFailedException(_))
                ) =>
            {
                // The SDK retries a write whose answer was lost (a reset connection, a 500
                // after the write): its retry then fails the condition against the write
                // itself. What is stored is then this very checkpoint at `next`.
                if self.stored(next).await?.as_deref() == Some(json.as_str()) {
                    *self.version.lock().expect("not poisoned") = Some(next);
                    *self.unsure.lock().expect("not poisoned") = None;
                    return Ok(Put::Saved);
                }
                // A save that failed before (every answer lost, the SDK's retries spent) had
                // landed: the item is at its version, with its checkpoint.
                let unsure = self.unsure.lock().expect("not poisoned").take();
                if let Some((version, earlier)) = unsure.filter(|(v, _)| *v == next) {
                    if self.stored(version).await?.as_deref() == Some(earlier.as_str()) {
                        *self.version.lock().expect("not poisoned") = Some(version);
                        return Ok(Put::EarlierLanded);
                    }
                }
                Err(Error::checkpoint(
                    format!(
                        "checkpoint {:?} in {} was saved by another reader since this one loaded it",
                        self.name, self.table
                    ),
                    e,
                ))
            }
            Err(e) => {
                *self.unsure.lock().expect("not poisoned") = Some((next, json));
                Err(dynamodb_err("PutItem")(e))
            }
        }
    }

    /// The checkpoint's item, by a consistent read.
    async fn item(&self) -> Result<Option<HashMap<String, AttributeValue>>, Error> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(KEY, AttributeValue::S(self.name.clone()))
            .consistent_read(true)
            .send()
            .await
            .map_err(dynamodb_err("GetItem"))?;
        Ok(out.item)
    }

    /// The checkpoint's JSON stored at `version`, if that is the version stored (a consistent
    /// read).
    async fn stored(&self, version: u64) -> Result<Option<String>, Error> {
        let Some(item) = self.item().await? else {
            return Ok(None);
        };
        let at = item
            .get("version")
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse::<u64>().ok());
        Ok(item
            .get("checkpoint")
            .and_then(|v| v.as_s().ok())
            .filter(|_| at == Some(version))
            .cloned())
    }
}
