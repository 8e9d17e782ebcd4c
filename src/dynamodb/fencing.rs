//! Fenced writes to your own DynamoDB items: a write that carries the lock's
//! fencing token and is accepted only if no holder with a greater (or, by
//! default, the same) token wrote the item before.
//!
//! A lease can run out while its holder is paused (a GC pause, a frozen VM)
//! and another process take the lock; the old holder, waking up, still
//! believes it holds it. The fencing token
//! ([`LockGuard::token`](crate::LockGuard::token)) tells them apart: it
//! strictly increases from one holder of a name to the next. A [`Fence`]
//! stores it on the item you write (attribute `fence` by default) and makes
//! the write conditional on `attribute_not_exists(fence) OR fence < token`,
//! so a late write from an older holder is refused with a
//! `ConditionalCheckFailedException` instead of overwriting newer data.
//!
//! ```no_run
//! # async fn demo(
//! #     client: aws_sdk_dynamodb::Client,
//! #     locker: tower_lease_lock::dynamodb::DynamoDbLocker,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use aws_sdk_dynamodb::types::AttributeValue;
//! use tower_lease_lock::dynamodb::fencing::Fence;
//! use tower_lease_lock::{LockName, Locker};
//!
//! let name = LockName::new("account-42")?;
//! let guard = locker.acquire(&name, Duration::from_secs(5)).await?;
//! let fence = Fence::new(guard.token()).repeatable();
//! let update = client
//!     .update_item()
//!     .table_name("accounts")
//!     .key("id", AttributeValue::S("42".into()))
//!     .update_expression("SET balance = :balance")
//!     .expression_attribute_values(":balance", AttributeValue::N("100".into()));
//! match fence.update_item(update).send().await {
//!     Ok(_) => {}
//!     Err(err) if err.as_service_error().is_some_and(|e| e.is_conditional_check_failed_exception()) => {
//!         // A newer holder wrote the item: this one lost the lock.
//!     }
//!     Err(err) => return Err(err.into()),
//! }
//! guard.release().await?;
//! # Ok(()) }
//! ```
//!
//! This only works if every writer of the item goes through a fence (a
//! write without one overwrites the attribute) and the item is written by
//! holders of one lock name.

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::put_item::builders::PutItemFluentBuilder;
use aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder;
use aws_sdk_dynamodb::types::AttributeValue;

/// The attribute a [`Fence`] writes when none is given.
pub const DEFAULT_FENCE_ATTRIBUTE: &str = "fence";

/// The placeholder of the fence attribute's name in expressions.
const NAME: &str = "#tll_fence";
/// The placeholder of the token in expressions.
const VALUE: &str = ":tll_fence";

/// A condition and an update that fence one write with a lock's token.
///
/// Use [`put_item`](Self::put_item) or [`update_item`](Self::update_item) on
/// a request you built, or the parts ([`condition`](Self::condition),
/// [`set_clause`](Self::set_clause), [`names`](Self::names),
/// [`values`](Self::values)) for requests of your own (a transaction item).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    attribute: String,
    token: u64,
    repeatable: bool,
}

impl Fence {
    /// A fence with `token` (the guard's
    /// [`token`](crate::LockGuard::token)) on the attribute
    /// [`DEFAULT_FENCE_ATTRIBUTE`].
    pub fn new(token: u64) -> Self {
        Self {
            attribute: DEFAULT_FENCE_ATTRIBUTE.to_string(),
            token,
            repeatable: false,
        }
    }

    /// Stores the token in `attribute` instead.
    #[must_use]
    pub fn attribute(mut self, attribute: impl Into<String>) -> Self {
        self.attribute = attribute.into();
        self
    }

    /// Also accepts a write that carries the token already stored
    /// (`fence <= token`): the same holder may write the item more than
    /// once. By default only a greater token is accepted.
    #[must_use]
    pub fn repeatable(mut self) -> Self {
        self.repeatable = true;
        self
    }

    /// The token.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// `(attribute_not_exists(#tll_fence) OR #tll_fence < :tll_fence)`
    /// (`<=` when [`repeatable`](Self::repeatable)).
    pub fn condition(&self) -> String {
        let op = if self.repeatable { "<=" } else { "<" };
        format!("(attribute_not_exists({NAME}) OR {NAME} {op} {VALUE})")
    }

    /// `#tll_fence = :tll_fence`, to put in an update expression's `SET`.
    pub fn set_clause(&self) -> String {
        format!("{NAME} = {VALUE}")
    }

    /// The expression attribute name the condition uses.
    pub fn names(&self) -> HashMap<String, String> {
        HashMap::from([(NAME.to_string(), self.attribute.clone())])
    }

    /// The expression attribute value the condition uses.
    pub fn values(&self) -> HashMap<String, AttributeValue> {
        HashMap::from([(VALUE.to_string(), self.value())])
    }

    fn value(&self) -> AttributeValue {
        AttributeValue::N(self.token.to_string())
    }

    /// Fences a PutItem: the item gets the token, and the condition (joined
    /// with yours by `AND`) refuses it if the stored token is greater.
    pub fn put_item(&self, put: PutItemFluentBuilder) -> PutItemFluentBuilder {
        let condition = joined(put.get_condition_expression().as_deref(), &self.condition());
        put.item(self.attribute.clone(), self.value())
            .condition_expression(condition)
            .expression_attribute_names(NAME, self.attribute.clone())
            .expression_attribute_values(VALUE, self.value())
    }

    /// Fences an UpdateItem: the update also sets the token (added to your
    /// update expression's `SET` clause, or as one of its own), and the
    /// condition (joined with yours by `AND`) refuses it if the stored token
    /// is greater.
    pub fn update_item(&self, update: UpdateItemFluentBuilder) -> UpdateItemFluentBuilder {
        let condition = joined(
            update.get_condition_expression().as_deref(),
            &self.condition(),
        );
        let expression = with_set(
            update.get_update_expression().as_deref(),
            &self.set_clause(),
        );
        update
            .update_expression(expression)
            .condition_expression(condition)
            .expression_attribute_names(NAME, self.attribute.clone())
            .expression_attribute_values(VALUE, self.value())
    }
}

fn joined(theirs: Option<&str>, ours: &str) -> String {
    match theirs {
        Some(theirs) if !theirs.trim().is_empty() => format!("({theirs}) AND {ours}"),
        _ => ours.to_string(),
    }
}

/// `clause` added to the `SET` of an update expression, or as a `SET` of
/// its own. `SET` is a reserved word: as a whole word it can only be the
/// clause keyword.
fn with_set(expression: Option<&str>, clause: &str) -> String {
    let Some(expression) = expression.filter(|e| !e.trim().is_empty()) else {
        return format!("SET {clause}");
    };
    let bytes = expression.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'#' || b == b':';
    let upper = expression.to_ascii_uppercase();
    let mut from = 0;
    while let Some(found) = upper[from..].find("SET") {
        let at = from + found;
        let end = at + 3;
        let before = at == 0 || !word(bytes[at - 1]);
        let after = end == bytes.len() || !word(bytes[end]);
        if before && after {
            return format!("{} {clause},{}", &expression[..end], &expression[end..]);
        }
        from = end;
    }
    format!("SET {clause} {expression}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clauses() {
        let c = "#tll_fence = :tll_fence";
        assert_eq!(with_set(None, c), "SET #tll_fence = :tll_fence");
        assert_eq!(
            with_set(Some("SET a = :a"), c),
            "SET #tll_fence = :tll_fence, a = :a"
        );
        assert_eq!(
            with_set(Some("REMOVE b SET a = :a"), c),
            "REMOVE b SET #tll_fence = :tll_fence, a = :a"
        );
        assert_eq!(
            with_set(Some("ADD #settings :one"), c),
            "SET #tll_fence = :tll_fence ADD #settings :one"
        );
        assert_eq!(
            with_set(Some("set offset = :o"), c),
            "set #tll_fence = :tll_fence, offset = :o"
        );
    }

    #[test]
    fn conditions() {
        assert_eq!(
            Fence::new(7).condition(),
            "(attribute_not_exists(#tll_fence) OR #tll_fence < :tll_fence)"
        );
        assert!(Fence::new(7).repeatable().condition().contains("<="));
        assert_eq!(joined(Some("a = :a"), "x"), "(a = :a) AND x");
        assert_eq!(joined(None, "x"), "x");
    }
}
