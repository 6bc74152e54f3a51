//! The plugin's unix socket: created with mode 0600 before anyone can connect, a stale
//! socket from a crashed run removed (never a live one), and removed again on shutdown.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("{0} is served by another running process; refusing to take it over")]
    Live(PathBuf),
    #[error("{0} exists and is not a socket; refusing to remove it")]
    NotASocket(PathBuf),
    #[error("failed to set up the socket {0}")]
    Io(PathBuf, #[source] std::io::Error),
}

/// A listening socket that removes its file when dropped (if it is still ours).
pub struct PluginSocket {
    pub listener: UnixListener,
    path: PathBuf,
    inode: (u64, u64),
}

impl PluginSocket {
    /// Binds `path`: removes a stale socket left by a crashed run, refuses a live one, and
    /// sets mode 0600 before the socket appears at `path` (it is bound in a private
    /// directory and renamed into place).
    pub async fn bind(path: &Path) -> Result<PluginSocket, SocketError> {
        let io = |e| SocketError::Io(path.to_owned(), e);
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path).await {
                Ok(_) => return Err(SocketError::Live(path.to_owned())),
                Err(_) => {
                    tracing::warn!(socket = %path.display(), "removing a stale socket from an earlier run");
                    std::fs::remove_file(path).map_err(io)?;
                }
            },
            Ok(_) => return Err(SocketError::NotASocket(path.to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(parent).map_err(io)?;
        let private = parent.join(format!(".kubekms-socket.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&private);
        std::fs::DirBuilder::new().mode(0o700).create(&private).map_err(io)?;
        let staged = private.join("sock");
        let result = (|| {
            let listener = UnixListener::bind(&staged)?;
            std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
            std::fs::rename(&staged, path)?;
            let meta = std::fs::symlink_metadata(path)?;
            Ok((listener, (meta.dev(), meta.ino())))
        })();
        let _ = std::fs::remove_dir_all(&private);
        let (listener, inode) = result.map_err(io)?;
        Ok(PluginSocket { listener, path: path.to_owned(), inode })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Splits off the listener; the returned guard removes the file when dropped.
    pub fn into_parts(self) -> (UnixListener, SocketGuard) {
        (self.listener, SocketGuard { path: self.path, inode: self.inode })
    }
}

/// Removes the socket file on drop (after the listener is closed), unless another process
/// has meanwhile put a live socket there.
pub struct SocketGuard {
    path: PathBuf,
    inode: (u64, u64),
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let Ok(meta) = std::fs::symlink_metadata(&self.path) else { return };
        // Inode numbers are reused, so also make sure nothing listens there any more:
        // our listener is closed by now, so a successful connect is someone else's.
        let ours = (meta.dev(), meta.ino()) == self.inode;
        if ours && std::os::unix::net::UnixStream::connect(&self.path).is_err() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn socket_is_private_and_stale_sockets_are_replaced_but_live_ones_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/kms.sock");
        let first = PluginSocket::bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // A live socket is refused.
        assert!(matches!(PluginSocket::bind(&path).await, Err(SocketError::Live(_))));
        // A crashed run leaves the file behind but nothing listens: it is replaced.
        drop(first.listener);
        assert!(path.exists());
        let second = PluginSocket::bind(&path).await.unwrap();
        let (listener, guard) = second.into_parts();
        drop(listener);
        drop(guard);
        assert!(!path.exists(), "shutdown removes the socket");
        // Not a socket: left alone.
        std::fs::write(&path, b"important").unwrap();
        assert!(matches!(PluginSocket::bind(&path).await, Err(SocketError::NotASocket(_))));
        assert_eq!(std::fs::read(&path).unwrap(), b"important");
    }

    #[tokio::test]
    async fn a_guard_does_not_remove_a_successors_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms.sock");
        let (l1, g1) = PluginSocket::bind(&path).await.unwrap().into_parts();
        drop(l1);
        let (_l2, _g2) = PluginSocket::bind(&path).await.unwrap().into_parts();
        drop(g1);
        assert!(path.exists(), "the old guard must not remove the new socket");
    }
}
