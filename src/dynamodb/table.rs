//! [`ensure_table`]: create the lock table when it is missing, and wait
//! until it is active.

use std::time::Duration;

use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableStatus,
};
use tokio::time::Instant;

use super::store::DynamoDbStore;

/// How long [`DynamoDbLocker::ensure_table`](super::DynamoDbLocker::ensure_table)
/// waits for a table to become active.
pub const ENSURE_TABLE_LIMIT: Duration = Duration::from_secs(120);

/// Why [`DynamoDbLocker::ensure_table`](super::DynamoDbLocker::ensure_table)
/// failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TableError {
    /// The table exists with another key than a string hash key of the
    /// locker's key attribute alone.
    #[error(
        "DynamoDB table {table:?} has the key {found}, not a string hash key {expected:?} alone"
    )]
    KeySchema {
        /// The table.
        table: String,
        /// The key attribute the locker uses.
        expected: String,
        /// The table's key, as DynamoDB describes it.
        found: String,
    },
    /// The table did not become active within [`ENSURE_TABLE_LIMIT`], or is
    /// in a state it will not leave by itself (archived, inaccessible).
    #[error("DynamoDB table {table:?} is {status}, not ACTIVE (waited {waited:?})")]
    NotActive {
        /// The table.
        table: String,
        /// Its last status.
        status: String,
        /// How long it was waited for.
        waited: Duration,
    },
    /// A DescribeTable or CreateTable request failed (no permission,
    /// unreachable, throttled).
    #[error("DynamoDB {operation} of table {table:?} failed: {message}")]
    Request {
        /// The table.
        table: String,
        /// `DescribeTable` or `CreateTable`.
        operation: &'static str,
        /// What DynamoDB or the connection said.
        message: String,
        /// The SDK's error.
        #[source]
        source: crate::BoxError,
    },
}

fn request<E>(store: &DynamoDbStore, operation: &'static str, err: SdkError<E>) -> TableError
where
    E: std::error::Error + Send + Sync + 'static,
{
    TableError::Request {
        table: store.table().to_string(),
        operation,
        message: DisplayErrorContext(&err).to_string(),
        source: Box::new(err),
    }
}

/// Creates the table (on-demand billing, a string hash key) when it does not
/// exist, then waits until it is active. A table created meanwhile by
/// somebody else is fine.
pub(crate) async fn ensure_table(store: &DynamoDbStore) -> Result<(), TableError> {
    let (client, table, key) = (store.client(), store.table(), store.key_attribute());
    let started = Instant::now();
    let mut pause = Duration::from_millis(100);
    let mut created = false;
    loop {
        let status = match client.describe_table().table_name(table).send().await {
            Ok(described) => {
                let description = described.table();
                let status = description.and_then(|t| t.table_status().cloned());
                if let Some(description) =
                    description.filter(|_| status == Some(TableStatus::Active))
                {
                    let schema = description.key_schema();
                    let string_key = description.attribute_definitions().iter().any(|d| {
                        d.attribute_name() == key && *d.attribute_type() == ScalarAttributeType::S
                    });
                    let hash_only = schema.len() == 1
                        && schema[0].attribute_name() == key
                        && *schema[0].key_type() == KeyType::Hash;
                    if !(hash_only && string_key) {
                        return Err(TableError::KeySchema {
                            table: table.to_string(),
                            expected: key.to_string(),
                            found: format!("{schema:?}"),
                        });
                    }
                    return Ok(());
                }
                status.map_or_else(|| "unknown".to_string(), |s| s.as_str().to_string())
            }
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception())
                    && !created =>
            {
                tracing::info!(table, key, "creating the DynamoDB lock table");
                let create = client
                    .create_table()
                    .table_name(table)
                    .billing_mode(BillingMode::PayPerRequest)
                    .attribute_definitions(
                        AttributeDefinition::builder()
                            .attribute_name(key)
                            .attribute_type(ScalarAttributeType::S)
                            .build()
                            .map_err(|e| request_build(store, e))?,
                    )
                    .key_schema(
                        KeySchemaElement::builder()
                            .attribute_name(key)
                            .key_type(KeyType::Hash)
                            .build()
                            .map_err(|e| request_build(store, e))?,
                    )
                    .send()
                    .await;
                match create {
                    Ok(_) => {}
                    // Somebody else is creating it: wait for it as well.
                    Err(err)
                        if err
                            .as_service_error()
                            .is_some_and(|e| e.code() == Some("ResourceInUseException")) => {}
                    Err(err) => return Err(request(store, "CreateTable", err)),
                }
                created = true;
                continue;
            }
            Err(err)
                if err
                    .as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()) =>
            {
                "not yet visible".to_string() // created: DescribeTable may lag
            }
            Err(err) => return Err(request(store, "DescribeTable", err)),
        };
        let waited = started.elapsed();
        let settling = matches!(
            status.as_str(),
            "CREATING" | "UPDATING" | "DELETING" | "not yet visible" | "unknown"
        );
        if !settling || waited + pause > ENSURE_TABLE_LIMIT {
            return Err(TableError::NotActive {
                table: table.to_string(),
                status,
                waited,
            });
        }
        if status == "DELETING" {
            created = false; // create it again once it is gone
        }
        tracing::debug!(table, %status, "waiting for the DynamoDB lock table to become active");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

fn request_build(store: &DynamoDbStore, err: aws_sdk_dynamodb::error::BuildError) -> TableError {
    TableError::Request {
        table: store.table().to_string(),
        operation: "CreateTable",
        message: err.to_string(),
        source: Box::new(err),
    }
}
