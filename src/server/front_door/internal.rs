//! The private socket between the front door and tiny_http, which no other process can reach.
//!
//! An abstract Unix socket has no permissions: any local user could connect and skip the door's caps and
//! timeouts. So the socket is bound in a fresh directory only this user can enter (0700), and the door
//! keeps an `O_PATH` descriptor of the socket itself. Then the socket and its directory are removed: from
//! then on the only way to the socket is `/proc/self/fd/N`, which only this process (and root) can follow.
//! Nothing stays on the file system, even after a `kill -9`, and the door can still reconnect whenever
//! tiny_http closes an internal connection.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

pub struct InternalSocket {
    /// An `O_PATH` descriptor of the socket's inode; connecting goes through it.
    _inode: OwnedFd,
    /// `/proc/self/fd/N`, the socket's only remaining name.
    path: CString,
}

/// Where the directory may be made, in order: the service manager's runtime directory, the user's, the
/// temporary directory, and /dev/shm (writable in containers whose root file system is read-only).
fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"]
        .iter()
        .filter_map(std::env::var_os)
        .filter(|v| !v.is_empty())
        // systemd may list several directories, separated by colons.
        .filter_map(|v| v.to_string_lossy().split(':').next().map(PathBuf::from))
        .collect();
    dirs.push(std::env::temp_dir());
    dirs.push(PathBuf::from("/dev/shm"));
    dirs.push(PathBuf::from("/tmp"));
    dirs.dedup();
    dirs
}

impl InternalSocket {
    /// Binds the socket and returns it with the listener to hand to tiny_http.
    pub fn create() -> Result<(InternalSocket, UnixListener), String> {
        let mut tried = Vec::new();
        for base in candidate_dirs() {
            match InternalSocket::create_in(&base) {
                Ok(made) => return Ok(made),
                Err(e) => tried.push(format!("{}: {e}", base.display())),
            }
        }
        Err(format!(
            "cannot create the internal socket in a private directory (tried {}); set TMPDIR to a \
             writable directory",
            tried.join("; ")
        ))
    }

    fn create_in(base: &Path) -> io::Result<(InternalSocket, UnixListener)> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = base.join(format!(
            "embedding-server-{}-{nanos:09}",
            std::process::id()
        ));
        // Fails if the name exists: the directory is certainly new, and ours.
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let file = dir.join("http.sock");
        let bound = UnixListener::bind(&file).and_then(|listener| {
            let name = CString::new(file.as_os_str().as_bytes())?;
            // SAFETY: a valid C string; O_PATH opens the inode without reading it.
            let fd = unsafe { libc::open(name.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` was just opened and is owned by nothing else.
            let inode = unsafe { OwnedFd::from_raw_fd(fd) };
            let path = CString::new(format!("/proc/self/fd/{}", inode.as_raw_fd()))?;
            Ok((
                InternalSocket {
                    _inode: inode,
                    path,
                },
                listener,
            ))
        });
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_dir(&dir);
        let (socket, listener) = bound?;
        // Prove the way in works before anything depends on it (it needs /proc), and take the test
        // connection off the backlog so that tiny_http never sees it.
        let test = socket.connect()?;
        listener.accept()?;
        drop(test);
        Ok((socket, listener))
    }

    /// A new non-blocking connection. `WouldBlock` means tiny_http's backlog is full: try again later.
    pub fn connect(&self) -> io::Result<UnixStream> {
        // SAFETY: socket() takes no pointers; the fd is owned right below.
        let fd = unsafe {
            libc::socket(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let stream = unsafe { UnixStream::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_un is valid; the path (with its NUL) fits, as checked.
        let mut address: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        address.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = self.path.as_bytes_with_nul();
        if bytes.len() > address.sun_path.len() {
            return Err(io::Error::other("the internal socket's path is too long"));
        }
        for (slot, byte) in address.sun_path.iter_mut().zip(bytes) {
            *slot = *byte as libc::c_char;
        }
        // SAFETY: `address` is a valid sockaddr_un of the size given.
        let result = unsafe {
            libc::connect(
                stream.as_raw_fd(),
                (&address as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        // A Unix stream connect either completes at once or reports a full backlog (EAGAIN).
        if result < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stream)
    }
}
