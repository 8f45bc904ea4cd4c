//! How transactions reach the kernel. A small trait so the `nft -f` writer (this one)
//! and a direct netlink writer can be swapped, and tests can count what was sent.

use crate::objects::TABLE;
use crate::rule::family_kw;
use crate::transaction::Transaction;
use kproxy_backend_api::IpFamily;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A failure talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error("cannot run `{0}`: {1}")]
    Spawn(String, std::io::Error),
    #[error("nft refused the transaction: {0}")]
    Refused(String),
    #[error("nft failed to list the table: {0}")]
    List(String),
}

/// Applies transactions and reads back kproxy's table.
pub trait NftWriter {
    /// Applies a transaction atomically: all of it or nothing.
    fn apply(&mut self, tx: &Transaction) -> Result<(), WriterError>;
    /// The table as `nft -j list table` JSON, or `None` if it does not exist.
    fn list_table(&mut self, family: IpFamily) -> Result<Option<String>, WriterError>;
    /// Deletes the table if it exists.
    fn delete_table(&mut self, family: IpFamily) -> Result<(), WriterError>;
}

/// Runs the `nft` binary: `nft -f FILE` with the rendered transaction.
#[derive(Debug, Clone)]
pub struct NftCli {
    binary: String,
    prefix: Vec<String>,
}

impl Default for NftCli {
    fn default() -> Self {
        NftCli {
            binary: std::env::var("KPROXY_NFT").unwrap_or_else(|_| "nft".to_string()),
            prefix: Vec::new(),
        }
    }
}

impl NftCli {
    /// Runs `nft` inside a named network namespace (`ip netns exec NAME nft …`): how
    /// tests drive a node's kernel without leaving the test process.
    pub fn in_netns(name: &str) -> Self {
        NftCli {
            binary: "ip".to_string(),
            prefix: ["netns", "exec", name, "nft"].map(String::from).to_vec(),
        }
    }

    fn run(
        &self,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<(bool, String, String), WriterError> {
        let mut cmd = Command::new(&self.binary);
        cmd.args(&self.prefix)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_err = |e| WriterError::Spawn(format!("{} {}", self.binary, args.join(" ")), e);
        let mut child = cmd.spawn().map_err(spawn_err)?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes()).map_err(spawn_err)?;
        }
        let out = child.wait_with_output().map_err(spawn_err)?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

fn missing_table(stderr: &str) -> bool {
    stderr.contains("No such file or directory")
}

impl NftWriter for NftCli {
    /// The script is written to a file first and `nft` starts only once it is complete:
    /// if kproxy dies while writing, `nft` never sees a truncated script. (Through a pipe,
    /// a script cut at a line boundary is valid nft and would commit half a sync.)
    fn apply(&mut self, tx: &Transaction) -> Result<(), WriterError> {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "kproxy-{}-{}.nft",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let file_err = |e| WriterError::Spawn(format!("write {}", path.display()), e);
        std::fs::write(&path, tx.render()).map_err(file_err)?;
        let result = self.run(&["-f", &path.to_string_lossy()], None);
        let _ = std::fs::remove_file(&path);
        let (ok, _, stderr) = result?;
        if ok {
            Ok(())
        } else {
            Err(WriterError::Refused(stderr.trim().to_string()))
        }
    }

    fn list_table(&mut self, family: IpFamily) -> Result<Option<String>, WriterError> {
        let (ok, stdout, stderr) =
            self.run(&["-j", "list", "table", family_kw(family), TABLE], None)?;
        match (ok, missing_table(&stderr)) {
            (true, _) => Ok(Some(stdout)),
            (false, true) => Ok(None),
            (false, false) => Err(WriterError::List(stderr.trim().to_string())),
        }
    }

    fn delete_table(&mut self, family: IpFamily) -> Result<(), WriterError> {
        let (ok, _, stderr) = self.run(&["delete", "table", family_kw(family), TABLE], None)?;
        if ok || missing_table(&stderr) {
            Ok(())
        } else {
            Err(WriterError::Refused(stderr.trim().to_string()))
        }
    }
}
