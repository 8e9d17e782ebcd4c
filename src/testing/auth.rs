//! etcd auth for test servers: the root user, auth enabled through the API,
//! and users with a role of their own.

use std::fmt;
use std::io;

use etcd_client::{Client, Permission};

use super::EtcdServer;

/// A user name and password of a test server.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    user: String,
    password: String,
}

impl Credentials {
    /// A user with a fresh random password.
    pub(super) fn generate(user: &str) -> Self {
        Self {
            user: user.to_string(),
            password: random_password(),
        }
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// `user:password`, as `etcdctl --user` takes it.
    pub fn etcdctl_user(&self) -> String {
        format!("{}:{}", self.user, self.password)
    }
}

/// The password stays out of test logs.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// 32 hex digits from the standard library's random hasher keys (a test
/// password needs no stronger randomness).
fn random_password() -> String {
    use std::hash::{BuildHasher, Hasher};
    (0..2)
        .map(|i| {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u32(i);
            format!("{:016x}", hasher.finish())
        })
        .collect()
}

fn api_error(what: &str, err: etcd_client::Error) -> io::Error {
    io::Error::other(format!("cannot {what}: {err}"))
}

/// Turns auth on the way an operator does: the `root` user and role, then
/// `auth enable` (on a client without a user: auth is still off).
pub(super) async fn enable(client: &mut Client, root: &Credentials) -> io::Result<()> {
    client
        .user_add(root.user(), root.password(), None)
        .await
        .map_err(|e| api_error("add the root user", e))?;
    client
        .role_add("root")
        .await
        .map_err(|e| api_error("add the root role", e))?;
    client
        .user_grant_role(root.user(), "root")
        .await
        .map_err(|e| api_error("grant the root role", e))?;
    client
        .auth_enable()
        .await
        .map_err(|e| api_error("enable auth", e))?;
    Ok(())
}

impl EtcdServer {
    /// Adds a user `name` with a fresh password and a role also called
    /// `name` that grants `permissions` (none: a user that may do nothing
    /// with keys), through the API as root. The server must have been
    /// started with [`auth`](super::EtcdServerBuilder::auth).
    ///
    /// ```no_run
    /// # async fn demo(etcd: tower_lease_lock::testing::EtcdServer) -> std::io::Result<()> {
    /// use tower_lease_lock::etcd_client::Permission;
    ///
    /// let locks = etcd
    ///     .add_user("locks", [Permission::read_write("billing/").with_prefix()])
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub async fn add_user(
        &self,
        name: &str,
        permissions: impl IntoIterator<Item = Permission>,
    ) -> io::Result<Credentials> {
        if self.root_credentials().is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "this test etcd runs without auth: start it with EtcdServer::builder().auth(true)",
            ));
        }
        let mut client = self
            .client()
            .await
            .map_err(|e| api_error("connect as root", e))?;
        let user = Credentials::generate(name);
        client
            .role_add(name)
            .await
            .map_err(|e| api_error("add the role", e))?;
        for permission in permissions {
            client
                .role_grant_permission(name, permission)
                .await
                .map_err(|e| api_error("grant a permission", e))?;
        }
        client
            .user_add(user.user(), user.password(), None)
            .await
            .map_err(|e| api_error("add the user", e))?;
        client
            .user_grant_role(user.user(), name)
            .await
            .map_err(|e| api_error("grant the role", e))?;
        Ok(user)
    }
}
