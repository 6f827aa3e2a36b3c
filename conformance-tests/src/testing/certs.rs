//! Certificates for the TLS tests, made with `openssl`.

use std::path::PathBuf;

use ticketrail_core::{Error, ErrorKind, Result};
use tokio::process::Command;

use super::io;

/// A certificate authority and a server certificate for 127.0.0.1 and
/// localhost, made with `openssl` in a temporary directory.
pub struct TestCerts {
    /// The directory holding them, removed on drop.
    pub dir: PathBuf,
    /// The CA certificate clients trust (PEM).
    pub ca: PathBuf,
    /// The server's certificate (PEM).
    pub cert: PathBuf,
    /// The server's private key (PEM).
    pub key: PathBuf,
}

impl TestCerts {
    /// Makes a CA and a server certificate signed by it.
    pub async fn generate() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "ticketrail-certs-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).map_err(io("creating the certificate directory"))?;
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
        )
        .map_err(io("writing the certificate extensions"))?;
        let steps: [&[&str]; 3] = [
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=ticketrail test CA",
            ],
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        ];
        for args in steps {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .await
                .map_err(io("running openssl (apt-get install openssl)"))?;
            if !out.status.success() {
                return Err(Error::new(
                    ErrorKind::Config,
                    format!(
                        "openssl {} failed: {}",
                        args[0],
                        String::from_utf8_lossy(&out.stderr)
                    ),
                ));
            }
        }
        let _ = Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(&dir)
            .status()
            .await;
        Ok(TestCerts {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            dir,
        })
    }
}

impl Drop for TestCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
