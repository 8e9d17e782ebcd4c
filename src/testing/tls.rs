//! [`TestCertificates`]: a CA and the certificates a TLS test server and its
//! clients use, generated at test time (features `test-util` and `tls`).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// The common name of the client certificate. etcd with `--client-cert-auth`
/// and auth enabled takes a request without a token as coming from the user
/// its certificate names, so this names no user of the test servers: a
/// request is only as privileged as its token says.
pub const CLIENT_CERT_NAME: &str = "tll-test-client";

/// A throwaway CA, a server certificate it signed (for `127.0.0.1` and
/// `localhost`) and a client certificate it signed (common name
/// [`CLIENT_CERT_NAME`]), all in PEM. Made fresh for every TLS
/// [`EtcdServer`](super::EtcdServer); never use them outside tests.
#[derive(Clone)]
pub struct TestCertificates {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

/// Where [`TestCertificates::write`] put the files etcd reads.
#[derive(Debug, Clone)]
pub(super) struct CertificateFiles {
    pub(super) ca: PathBuf,
    pub(super) server_cert: PathBuf,
    pub(super) server_key: PathBuf,
}

fn invalid(what: &str, err: rcgen::Error) -> io::Error {
    io::Error::other(format!("cannot make the test {what}: {err}"))
}

impl TestCertificates {
    /// Generates a CA (ECDSA P-256) and a server and a client certificate
    /// signed by it.
    pub fn generate() -> io::Result<Self> {
        let ca_key = KeyPair::generate().map_err(|e| invalid("CA key", e))?;
        let mut ca_params =
            CertificateParams::new(Vec::<String>::new()).map_err(|e| invalid("CA", e))?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "tower-lease-lock test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params
            .self_signed(&ca_key)
            .map_err(|e| invalid("CA", e))?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |names: Vec<String>, common_name: &str, usages| {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(names)?;
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = usages;
            let cert = params.signed_by(&key, &issuer)?;
            Ok::<_, rcgen::Error>((cert.pem(), key.serialize_pem()))
        };
        // etcd's own gateway dials the server with the server certificate, so
        // it is a client certificate too.
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            "tll-test-etcd",
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        )
        .map_err(|e| invalid("server certificate", e))?;
        let (client_cert, client_key) = leaf(
            Vec::new(),
            CLIENT_CERT_NAME,
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        )
        .map_err(|e| invalid("client certificate", e))?;
        Ok(Self {
            ca: ca.pem(),
            server_cert,
            server_key,
            client_cert,
            client_key,
        })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca
    }

    /// The client certificate, PEM.
    pub fn client_cert_pem(&self) -> &str {
        &self.client_cert
    }

    /// The client certificate's private key, PEM (PKCS#8).
    pub fn client_key_pem(&self) -> &str {
        &self.client_key
    }

    /// The CA certificate, for [`TlsOptions::ca_certificate`].
    ///
    /// [`TlsOptions::ca_certificate`]: etcd_client::TlsOptions::ca_certificate
    pub fn ca_certificate(&self) -> etcd_client::Certificate {
        etcd_client::Certificate::from_pem(&self.ca)
    }

    /// The client certificate and key, for [`TlsOptions::identity`].
    ///
    /// [`TlsOptions::identity`]: etcd_client::TlsOptions::identity
    pub fn client_identity(&self) -> etcd_client::Identity {
        etcd_client::Identity::from_pem(&self.client_cert, &self.client_key)
    }

    /// TLS options that trust the CA, with the client identity when
    /// `with_identity`.
    pub fn tls_options(&self, with_identity: bool) -> etcd_client::TlsOptions {
        let options = etcd_client::TlsOptions::new().ca_certificate(self.ca_certificate());
        if with_identity {
            options.identity(self.client_identity())
        } else {
            options
        }
    }

    /// Writes the CA and the server's certificate and key into `dir`, and the
    /// client's too (for `etcdctl --cacert --cert --key`).
    pub(super) fn write(&self, dir: &Path) -> io::Result<CertificateFiles> {
        let files = CertificateFiles {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
        };
        std::fs::write(&files.ca, &self.ca)?;
        std::fs::write(&files.server_cert, &self.server_cert)?;
        std::fs::write(&files.server_key, &self.server_key)?;
        std::fs::write(dir.join("client.pem"), &self.client_cert)?;
        std::fs::write(dir.join("client-key.pem"), &self.client_key)?;
        Ok(files)
    }
}

/// Certificates only: no private key in test logs.
impl fmt::Debug for TestCertificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCertificates")
            .field("ca", &self.ca)
            .field("client_cert", &self.client_cert)
            .finish_non_exhaustive()
    }
}
