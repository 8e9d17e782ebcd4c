//! [`DynamoDbStore`]: the lease-store calls, one DynamoDB request each.
//!
//! ```text
//! take     UpdateItem  if no item, or released, or our own version (a retry),
//!                      or the stale version seen for a whole lease:
//!                      SET owner, rvn, lease_ms, released = false  ADD token 1
//! observe  GetItem     (consistent read) free, or held by rvn for lease_ms
//! renew    UpdateItem  if owner is us, not released, rvn is ours: SET rvn = next
//! release  UpdateItem  if rvn is ours: SET released = true  REMOVE owner
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};
use aws_sdk_dynamodb::Client;

use super::{BACKEND, LEASE_MS, OWNER, RELEASED, RVN, TOKEN};
use crate::store::{Busy, LeaseStore, Observed, StoreError, Take};
use crate::{Holder, LockName};

/// Error codes that mean "slow down" or "try again": repeating may help.
const TRANSIENT: &[&str] = &[
    "ProvisionedThroughputExceededException",
    "ThrottlingException",
    "Throttling",
    "RequestLimitExceeded",
    "LimitExceededException",
    "TransactionConflictException",
    "InternalServerError",
    "InternalFailure",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// The most attempts of one call (the SDK retries throttling and transient
/// failures, all within the request timeout).
const ATTEMPTS: u32 = 4;

/// One hold of a lock: the record version numbers this acquisition writes,
/// `<uuid>:<n>`. The take writes `n = 0` and each renewal the next `n`, so a
/// write repeated after its answer was lost (the SDK's retry, or the
/// renewal task's retry after a timeout) finds its own version and succeeds
/// again instead of looking like somebody else's.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct DynamoDbHold {
    acquisition: Arc<str>,
    n: u64,
}

impl DynamoDbHold {
    fn rvn(&self) -> String {
        format!("{}:{}", self.acquisition, self.n)
    }

    fn next(&self) -> Self {
        Self {
            acquisition: Arc::clone(&self.acquisition),
            n: self.n + 1,
        }
    }
}

impl fmt::Debug for DynamoDbHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rvn())
    }
}

/// The DynamoDB calls of a [`DynamoDbLocker`](super::DynamoDbLocker).
pub(crate) struct DynamoDbStore {
    client: Client,
    table: String,
    key_attribute: String,
    /// `<uuid> <host>:<pid>`: unique per locker, readable in the table.
    owner: String,
    lease: Duration,
    /// Retries and timeouts of every call, within the request timeout.
    overrides: aws_sdk_dynamodb::config::Builder,
}

impl DynamoDbStore {
    pub(crate) fn new(
        client: Client,
        table: String,
        key_attribute: String,
        owner: String,
        lease: Duration,
        request_timeout: Duration,
    ) -> Self {
        // The core drops a call at the request timeout; the SDK gives up a
        // little earlier so that its error (with its cause) is what we see.
        let operation = request_timeout.mul_f64(0.9);
        let overrides = aws_sdk_dynamodb::Config::builder()
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(ATTEMPTS)
                    .with_initial_backoff(Duration::from_millis(20))
                    .with_max_backoff((request_timeout / 4).max(Duration::from_millis(20))),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(request_timeout / 2)
                    .operation_attempt_timeout(request_timeout / 2)
                    .operation_timeout(operation)
                    .build(),
            );
        Self {
            client,
            table,
            key_attribute,
            owner,
            lease,
            overrides,
        }
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn table(&self) -> &str {
        &self.table
    }

    pub(crate) fn key_attribute(&self) -> &str {
        &self.key_attribute
    }

    pub(crate) fn owner(&self) -> &str {
        &self.owner
    }

    fn key(&self, name: &LockName) -> AttributeValue {
        AttributeValue::S(name.encoded())
    }

    /// The message of a missing table.
    fn no_table(&self) -> String {
        format!(
            "DynamoDB table {:?} does not exist (or is not active, or not in this account and region): \
             create it with DynamoDbLocker::ensure_table(), or by hand with a string hash key {:?}",
            self.table, self.key_attribute
        )
    }

    /// The [`StoreError`] of a failed call that was not a failed condition.
    fn error<E>(&self, operation: &str, err: SdkError<E>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        match &err {
            SdkError::ServiceError(service) => {
                let code = service.err().code().unwrap_or("");
                if code == "ResourceNotFoundException" {
                    StoreError::Refused(self.no_table())
                } else if TRANSIENT.contains(&code) || status.is_some_and(|s| s >= 500) {
                    StoreError::unavailable(
                        format!(
                            "DynamoDB {operation} on table {:?} failed: {code}",
                            self.table
                        ),
                        err,
                    )
                } else {
                    // Access denied, bad credentials, validation: repeating
                    // cannot help.
                    StoreError::Refused(format!(
                        "DynamoDB refused {operation} on table {:?}: {}",
                        self.table,
                        DisplayErrorContext(&err)
                    ))
                }
            }
            SdkError::ConstructionFailure(_) => StoreError::Refused(format!(
                "DynamoDB {operation} on table {:?} could not be sent: {}",
                self.table,
                DisplayErrorContext(&err)
            )),
            // Timeouts, connection and I/O failures, unreadable answers.
            _ => StoreError::unavailable(
                format!(
                    "DynamoDB {operation} on table {:?} failed: {}",
                    self.table,
                    DisplayErrorContext(&err)
                ),
                err,
            ),
        }
    }

    /// What an item says of its holder; `None` when it is free.
    fn busy(&self, item: &HashMap<String, AttributeValue>) -> Option<Busy<String>> {
        let released = item
            .get(RELEASED)
            .and_then(|v| v.as_bool().ok())
            .copied()
            .unwrap_or(false);
        if released {
            return None;
        }
        let number = |attr: &str| {
            item.get(attr)
                .and_then(|v| v.as_n().ok())
                .and_then(|n| n.parse::<u64>().ok())
        };
        let rvn = item.get(RVN).and_then(|v| v.as_s().ok()).cloned();
        let owner = item.get(OWNER).and_then(|v| v.as_s().ok()).cloned();
        Some(Busy {
            // Without a version it cannot be taken over: it never changes.
            stale_after: rvn
                .as_ref()
                .and(number(LEASE_MS))
                .map(Duration::from_millis),
            seen: rvn,
            holder: Some(Holder {
                token: number(TOKEN),
                key: owner,
                ..Holder::default()
            }),
        })
    }
}

/// `true` when an UpdateItem failed its condition: an answer, not an error.
fn condition_failed<R>(err: &SdkError<UpdateItemError, R>) -> bool {
    err.as_service_error()
        .is_some_and(UpdateItemError::is_conditional_check_failed_exception)
}

fn names(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect()
}

fn string(s: impl Into<String>) -> AttributeValue {
    AttributeValue::S(s.into())
}

impl LeaseStore for DynamoDbStore {
    type Hold = DynamoDbHold;
    type Seen = String;

    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn new_hold(&self) -> DynamoDbHold {
        DynamoDbHold {
            acquisition: uuid::Uuid::new_v4().to_string().into(),
            n: 0,
        }
    }

    async fn take(
        &self,
        name: &LockName,
        hold: &DynamoDbHold,
        stale: Option<&String>,
    ) -> Result<Take<String>, StoreError> {
        let mut condition =
            "attribute_not_exists(#k) OR #released = :true OR #rvn = :rvn".to_string();
        let mut values = HashMap::from([
            (":owner".to_string(), string(&self.owner)),
            (":rvn".to_string(), string(hold.rvn())),
            (
                ":lease".to_string(),
                AttributeValue::N(self.lease.as_millis().to_string()),
            ),
            (":false".to_string(), AttributeValue::Bool(false)),
            (":true".to_string(), AttributeValue::Bool(true)),
            (":one".to_string(), AttributeValue::N("1".into())),
        ]);
        if let Some(stale) = stale {
            condition.push_str(" OR #rvn = :stale");
            values.insert(":stale".to_string(), string(stale));
        }
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(&self.key_attribute, self.key(name))
            .update_expression(
                "SET #owner = :owner, #rvn = :rvn, #lease = :lease, #released = :false ADD #token :one",
            )
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names(&[
                ("#k", &self.key_attribute),
                ("#owner", OWNER),
                ("#rvn", RVN),
                ("#lease", LEASE_MS),
                ("#released", RELEASED),
                ("#token", TOKEN),
            ])))
            .set_expression_attribute_values(Some(values))
            .return_values(ReturnValue::UpdatedNew)
            // DynamoDB returns the holder's item with the refusal (one
            // request for a failed try); emulators may not.
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .customize()
            .config_override(self.overrides.clone())
            .send()
            .await;
        match result {
            Ok(output) => {
                let token = output
                    .attributes()
                    .and_then(|a| a.get(TOKEN))
                    .and_then(|v| v.as_n().ok())
                    .and_then(|n| n.parse::<u64>().ok())
                    .ok_or_else(|| StoreError::Unavailable {
                        message: format!(
                            "DynamoDB UpdateItem on table {:?} did not return the {TOKEN:?} counter",
                            self.table
                        ),
                        source: None,
                    })?;
                Ok(Take::Taken { token })
            }
            Err(err) => match err.as_service_error() {
                // The old item, where the service returns it (dynalite does not).
                Some(UpdateItemError::ConditionalCheckFailedException(failed)) => {
                    let busy = failed.item().and_then(|item| self.busy(item));
                    Ok(Take::Busy(busy.unwrap_or_else(Busy::unknown)))
                }
                _ => Err(self.error("UpdateItem (take)", err)),
            },
        }
    }

    async fn observe(&self, name: &LockName) -> Result<Observed<String>, StoreError> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(&self.key_attribute, self.key(name))
            .consistent_read(true)
            .projection_expression("#owner, #rvn, #lease, #released, #token")
            .set_expression_attribute_names(Some(names(&[
                ("#owner", OWNER),
                ("#rvn", RVN),
                ("#lease", LEASE_MS),
                ("#released", RELEASED),
                ("#token", TOKEN),
            ])))
            .customize()
            .config_override(self.overrides.clone())
            .send()
            .await
            .map_err(|err| self.error("GetItem", err))?;
        Ok(match output.item().and_then(|item| self.busy(item)) {
            Some(busy) => Observed::Held(busy),
            None => Observed::Free,
        })
    }

    async fn renew(
        &self,
        name: &LockName,
        hold: &DynamoDbHold,
    ) -> Result<DynamoDbHold, StoreError> {
        let next = hold.next();
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(&self.key_attribute, self.key(name))
            .update_expression("SET #rvn = :next")
            .condition_expression(
                "#owner = :owner AND #released = :false AND (#rvn = :current OR #rvn = :next)",
            )
            .set_expression_attribute_names(Some(names(&[
                ("#owner", OWNER),
                ("#rvn", RVN),
                ("#released", RELEASED),
            ])))
            .set_expression_attribute_values(Some(HashMap::from([
                (":owner".to_string(), string(&self.owner)),
                (":false".to_string(), AttributeValue::Bool(false)),
                (":current".to_string(), string(hold.rvn())),
                (":next".to_string(), string(next.rvn())),
            ])))
            .customize()
            .config_override(self.overrides.clone())
            .send()
            .await;
        match result {
            Ok(_) => Ok(next),
            Err(err) if condition_failed(&err) => Err(StoreError::Gone(format!(
                "the item of {name} in DynamoDB table {:?} was released, taken over or changed",
                self.table
            ))),
            Err(err) => Err(self.error("UpdateItem (heartbeat)", err)),
        }
    }

    async fn release(&self, name: &LockName, hold: &DynamoDbHold) -> Result<(), StoreError> {
        // A renewal may have landed after the last one we saw confirmed.
        let next = hold.next();
        let result = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(&self.key_attribute, self.key(name))
            .update_expression("SET #released = :true REMOVE #owner")
            .condition_expression("#rvn = :current OR #rvn = :next")
            .set_expression_attribute_names(Some(names(&[
                ("#owner", OWNER),
                ("#rvn", RVN),
                ("#released", RELEASED),
            ])))
            .set_expression_attribute_values(Some(HashMap::from([
                (":true".to_string(), AttributeValue::Bool(true)),
                (":current".to_string(), string(hold.rvn())),
                (":next".to_string(), string(next.rvn())),
            ])))
            .customize()
            .config_override(self.overrides.clone())
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            // Not ours (any more): nothing to give back.
            Err(err) if condition_failed(&err) => Ok(()),
            Err(err) => Err(self.error("UpdateItem (release)", err)),
        }
    }
}
