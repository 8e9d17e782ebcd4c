//! What an Azure Storage answer means for a lock: a status and the service's
//! error code (`x-ms-error-code`), mapped to [`StoreError`].

use azure_core::error::ErrorKind;

use crate::store::StoreError;

/// The HTTP status and the service's error code of a failed call, when the
/// service answered.
pub(crate) fn answer(err: &azure_core::Error) -> Option<(u16, &str)> {
    match err.kind() {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => Some((u16::from(*status), error_code.as_deref().unwrap_or(""))),
        _ => None,
    }
}

/// `true` when the service answered `status` (with any error code).
pub(crate) fn is_status(err: &azure_core::Error, status: u16) -> bool {
    answer(err).is_some_and(|(s, _)| s == status)
}

/// `true` when the service answered with this error code.
pub(crate) fn is_code(err: &azure_core::Error, code: &str) -> bool {
    answer(err).is_some_and(|(_, c)| c.eq_ignore_ascii_case(code))
}

/// A failed call that is not one of the answers the caller expects: refused
/// for good when repeating cannot help (no permission, a missing container,
/// a request the service rejects), unavailable otherwise (no answer, a
/// timeout, throttling, a server error).
pub(crate) fn store_error(what: &str, err: azure_core::Error) -> StoreError {
    match answer(&err) {
        Some((status @ (401 | 403), code)) => StoreError::Refused(format!(
            "{what}: {status} {code}: the credential may not use the container \
             (the locker needs to read, write and create blobs in it)"
        )),
        Some((404, code)) if code.eq_ignore_ascii_case("ContainerNotFound") => StoreError::Refused(
            format!("{what}: 404 ContainerNotFound: create the container first"),
        ),
        Some((status @ (400 | 405 | 411 | 413 | 414 | 416), code)) => {
            StoreError::Refused(format!("{what}: {status} {code}: {err}"))
        }
        Some((status, code)) => {
            StoreError::unavailable(format!("{what}: the service answered {status} {code}"), err)
        }
        None => StoreError::unavailable(format!("{what} failed: {err}"), err),
    }
}
