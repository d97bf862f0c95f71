//! The embedded nats-server's credentials and settings: one user with a password generated at the
//! first start and kept in `<data-dir>/nats-password` (mode 0600, so external systems on this
//! machine that may read it can publish events), loopback only, and every JetStream write synced
//! to disk before it is acknowledged.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// The user `atelier up`'s own processes and external publishers connect as.
pub const USER: &str = "atelier";

/// The password (created on first use) and the server config file that requires it.
pub fn prepare(data_dir: &Path) -> anyhow::Result<(String, PathBuf)> {
    let password = password(&data_dir.join("nats-password"))?;
    let conf = data_dir.join("nats.conf");
    let text = format!(
        "# Written by `atelier up` at every start; the password is in nats-password.\n\
         authorization {{ user: {USER}, password: \"{password}\" }}\n\
         jetstream {{ sync_interval: always }}\n"
    );
    private_file(&conf, text.as_bytes())?;
    Ok((password, conf))
}

fn password(path: &Path) -> anyhow::Result<String> {
    if let Ok(existing) = std::fs::read_to_string(path) {
        let existing = existing.trim().to_owned();
        if existing.len() >= 16 && existing.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Ok(existing);
        }
        tracing::warn!(path = %path.display(), "replacing an unusable embedded NATS password");
    }
    let fresh = hex::encode(rand::random::<[u8; 24]>());
    private_file(path, fresh.as_bytes())?;
    Ok(fresh)
}

/// Writes `bytes` to a file only its owner can read.
fn private_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_password_is_generated_once_private_and_required() {
        let tmp = tempfile::tempdir().unwrap();
        let (pw, conf) = prepare(tmp.path()).unwrap();
        assert_eq!(pw.len(), 48);
        let (again, _) = prepare(tmp.path()).unwrap();
        assert_eq!(pw, again, "kept across restarts");
        for f in [conf.clone(), tmp.path().join("nats-password")] {
            let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", f.display());
        }
        let text = std::fs::read_to_string(conf).unwrap();
        assert!(text.contains(&pw) && text.contains("sync_interval: always"));
    }
}
