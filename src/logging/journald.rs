//! journald's native protocol: each event is one datagram of fields sent to
//! `/run/systemd/journal/socket`, so `journalctl SUBSCRIPTION=acme-fintoro/801` and
//! `journalctl -o json` see rekey's fields. The protocol: `KEY=value\n` per field, or
//! `KEY\n`, the value's length as a little-endian u64, the value and `\n` for a value
//! with a newline in it; an entry too big for one datagram goes in a sealed memfd
//! passed over the socket instead.
//!
//! MESSAGE is the text a stderr line carries (the message, then `key=value`s), so a
//! plain `journalctl -u rekey` reads as before. Each field also stands on its own,
//! upper-cased (`subscription` → SUBSCRIPTION, `rotation` → ROTATION, `event` →
//! EVENT), except that a subscription's phase (`state`, a transition's `to`) is
//! PHASE, and an event that names a subscription but no provider gets PROVIDER from
//! the subscription's name (`<provider>/<id>`). Fields carry only what events log,
//! and rekey never logs a secret.

use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::mem::MaybeUninit;
use std::os::fd::AsFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixDatagram;
use std::path::Path;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::io::Errno;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;

/// Where journald listens for native-protocol entries.
pub const SOCKET: &str = "/run/systemd/journal/socket";

/// The journal's own fields: an event field that upper-cases to one of these is
/// prefixed with `REKEY_` so it cannot pass for it.
const RESERVED: &[&str] = &[
    "MESSAGE",
    "MESSAGE_ID",
    "PRIORITY",
    "CODE_FILE",
    "CODE_LINE",
    "CODE_FUNC",
    "ERRNO",
    "INVOCATION_ID",
    "USER_INVOCATION_ID",
    "SYSLOG_FACILITY",
    "SYSLOG_IDENTIFIER",
    "SYSLOG_PID",
    "SYSLOG_TIMESTAMP",
    "SYSLOG_RAW",
    "DOCUMENTATION",
    "TID",
    "UNIT",
    "USER_UNIT",
];

/// A tracing layer that sends every event to journald.
pub struct Journald {
    socket: UnixDatagram,
    addr: SocketAddrUnix,
}

impl Journald {
    /// Talks to the journal socket at `path`; an error when there is none (no systemd,
    /// or a container without a journal), so the caller logs to stderr instead.
    pub fn open(path: &Path) -> io::Result<Journald> {
        if !std::fs::metadata(path)?.file_type().is_socket() {
            return Err(io::Error::other(format!(
                "{} is not a socket",
                path.display()
            )));
        }
        Ok(Journald {
            socket: UnixDatagram::unbound()?,
            addr: SocketAddrUnix::new(path)?,
        })
    }

    fn send(&self, entry: &[u8]) -> io::Result<()> {
        // Not connected: a restarted journald binds a new socket at the same path.
        match rustix::net::sendto(&self.socket, entry, SendFlags::empty(), &self.addr) {
            Ok(_) => Ok(()),
            Err(Errno::MSGSIZE | Errno::NOBUFS) => self.send_memfd(entry),
            Err(e) => Err(e.into()),
        }
    }

    /// The protocol's way for an entry larger than a datagram: the entry in a memfd,
    /// sealed so journald can trust it does not change, sent as the only payload.
    fn send_memfd(&self, entry: &[u8]) -> io::Result<()> {
        let flags = MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING;
        let mut file = File::from(rustix::fs::memfd_create("rekey-journal", flags)?);
        file.write_all(entry)?;
        let seals = SealFlags::SHRINK | SealFlags::GROW | SealFlags::WRITE | SealFlags::SEAL;
        rustix::fs::fcntl_add_seals(&file, seals)?;
        let fds = [file.as_fd()];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        control.push(SendAncillaryMessage::ScmRights(&fds));
        rustix::net::sendmsg_addr(
            &self.socket,
            &self.addr,
            &[],
            &mut control,
            SendFlags::empty(),
        )?;
        Ok(())
    }
}

impl<S: Subscriber> Layer<S> for Journald {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        let priority = crate::journal::priority(event.metadata().level());
        if self
            .send(&fields.entry(priority, event.metadata()))
            .is_err()
        {
            // journald gone (restarting): stderr is the journal stream under systemd,
            // so the line still reaches it, without the fields.
            eprintln!("<{priority}>{}", fields.text());
        }
    }
}

/// An event's fields, as the journal and as a text line want them.
#[derive(Default)]
struct Fields {
    message: String,
    /// ` key=value` for each field but the message, as the stderr lines show them.
    rest: String,
    journal: Vec<(String, String)>,
}

impl Fields {
    fn add(&mut self, name: &str, value: String, shown: fmt::Arguments<'_>) {
        if name == "message" {
            self.message = value;
            return;
        }
        // Metadata of records from the `log` crate, already in CODE_FILE and so on.
        if name.starts_with("log.") {
            return;
        }
        self.rest.push_str(&format!(" {name}={shown}"));
        // rekey writes `-` for "none" (no rotation under way): no field to match on.
        if value != "-" {
            self.journal.push((journal_name(name), value));
        }
    }

    fn text(&self) -> String {
        format!("{}{}", self.message, self.rest)
    }

    /// The datagram for journald.
    fn entry(&self, priority: u8, meta: &tracing::Metadata<'_>) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        put(&mut out, "PRIORITY", &priority.to_string());
        put(&mut out, "SYSLOG_IDENTIFIER", "rekey");
        put(&mut out, "MESSAGE", &self.text());
        if let Some(file) = meta.file() {
            put(&mut out, "CODE_FILE", file);
        }
        if let Some(line) = meta.line() {
            put(&mut out, "CODE_LINE", &line.to_string());
        }
        for (k, v) in &self.journal {
            put(&mut out, k, v);
        }
        let has = |key: &str| self.journal.iter().any(|(k, _)| k == key);
        if !has("PROVIDER") {
            let sub = self.journal.iter().find(|(k, _)| k == "SUBSCRIPTION");
            if let Some((provider, _)) = sub.and_then(|(_, v)| v.split_once('/')) {
                put(&mut out, "PROVIDER", provider);
            }
        }
        out
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.add(field.name(), value.to_string(), format_args!("{value:?}"));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let v = format!("{value:?}");
        self.add(field.name(), v.clone(), format_args!("{v}"));
    }
}

/// A tracing field's name as a journal field: upper-case letters, digits and `_`,
/// starting with a letter, not one of the journal's own, at most 64 bytes.
fn journal_name(name: &str) -> String {
    if name == "state" || name == "to" {
        return "PHASE".into();
    }
    let mut n: String = name
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' => c.to_ascii_uppercase(),
            _ => '_',
        })
        .collect();
    if RESERVED.contains(&n.as_str()) || !n.starts_with(|c: char| c.is_ascii_uppercase()) {
        n.insert_str(0, "REKEY_");
    }
    n.truncate(64);
    n
}

/// Appends one field: `KEY=value\n`, or the length-prefixed form when the value has a
/// newline (which would otherwise end the field).
fn put(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    if value.contains('\n') {
        out.push(b'\n');
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        out.push(b'=');
    }
    out.extend_from_slice(value.as_bytes());
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{Read, Seek};
    use tracing_subscriber::layer::SubscriberExt;

    /// A stand-in journald: a datagram socket in a temp dir.
    struct FakeJournal {
        _dir: tempfile::TempDir,
        socket: UnixDatagram,
        path: std::path::PathBuf,
    }

    impl FakeJournal {
        fn new() -> FakeJournal {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("socket");
            let socket = UnixDatagram::bind(&path).unwrap();
            socket.set_nonblocking(true).unwrap();
            FakeJournal {
                _dir: dir,
                socket,
                path,
            }
        }

        /// Logs what `emit` logs through the layer, at every level.
        fn log(&self, emit: impl FnOnce()) {
            let layer = Journald::open(&self.path).unwrap();
            let subscriber = tracing_subscriber::registry().with(layer);
            tracing::subscriber::with_default(subscriber, emit);
        }

        fn entry(&self) -> Vec<(String, String)> {
            self.entry_and_how().0
        }

        /// The next entry, from a datagram or a memfd passed with one (then true);
        /// decoded.
        fn entry_and_how(&self) -> (Vec<(String, String)>, bool) {
            let mut buf = vec![0u8; 1 << 16];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = rustix::net::RecvAncillaryBuffer::new(&mut space);
            let msg = rustix::net::recvmsg(
                &self.socket,
                &mut [io::IoSliceMut::new(&mut buf)],
                &mut control,
                rustix::net::RecvFlags::empty(),
            )
            .expect("an entry was sent");
            let mut data = buf[..msg.bytes].to_vec();
            let mut memfd = false;
            for m in control.drain() {
                if let rustix::net::RecvAncillaryMessage::ScmRights(fds) = m {
                    for fd in fds {
                        // The sender's offset is shared: journald reads from the start.
                        let mut file = File::from(fd);
                        file.seek(io::SeekFrom::Start(0)).unwrap();
                        file.read_to_end(&mut data).unwrap();
                        memfd = true;
                    }
                }
            }
            (decode(&data), memfd)
        }

        fn nothing_more(&self) {
            let mut buf = [0u8; 16];
            assert!(
                self.socket.recv(&mut buf).is_err(),
                "another entry was sent"
            );
        }
    }

    /// The protocol's decoder, as journald reads an entry.
    fn decode(mut data: &[u8]) -> Vec<(String, String)> {
        let mut out = vec![];
        while !data.is_empty() {
            let end = data.iter().position(|&b| b == b'\n').unwrap();
            let line = std::str::from_utf8(&data[..end]).unwrap();
            data = &data[end + 1..];
            if let Some((k, v)) = line.split_once('=') {
                out.push((k.to_string(), v.to_string()));
            } else {
                let len = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
                let value = std::str::from_utf8(&data[8..8 + len]).unwrap();
                assert_eq!(data[8 + len], b'\n', "a binary value ends with a newline");
                out.push((line.to_string(), value.to_string()));
                data = &data[8 + len + 1..];
            }
        }
        out
    }

    fn map(entry: &[(String, String)]) -> HashMap<&str, &str> {
        entry
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect()
    }

    #[test]
    fn a_transition_carries_its_fields_with_the_message_and_priority() {
        let j = FakeJournal::new();
        j.log(|| {
            tracing::info!(
                subscription = %"acme-fintoro/801",
                rotation = "r-1",
                from = %"idle",
                to = %"rotating",
                event = "rotate-started",
                "rotating the secret"
            );
        });
        let entry = j.entry();
        let f = map(&entry);
        assert_eq!(f["PRIORITY"], "6", "{entry:?}");
        assert_eq!(f["SYSLOG_IDENTIFIER"], "rekey");
        assert_eq!(f["SUBSCRIPTION"], "acme-fintoro/801");
        assert_eq!(f["PROVIDER"], "acme-fintoro");
        assert_eq!(f["ROTATION"], "r-1");
        assert_eq!(f["PHASE"], "rotating");
        assert_eq!(f["FROM"], "idle");
        assert_eq!(f["EVENT"], "rotate-started");
        assert_eq!(
            f["MESSAGE"],
            "rotating the secret subscription=acme-fintoro/801 rotation=\"r-1\" from=idle \
             to=rotating event=\"rotate-started\""
        );
        assert!(f["CODE_FILE"].ends_with("journald.rs"), "{entry:?}");
        assert!(f.contains_key("CODE_LINE"));
        j.nothing_more();
    }

    #[test]
    fn each_level_has_its_priority_and_a_named_provider_is_kept() {
        let j = FakeJournal::new();
        j.log(|| {
            tracing::error!(subscription = %"a/1", provider = %"b", "e");
            tracing::warn!(state = %"held", "w");
            tracing::info!("i");
            tracing::debug!("d");
        });
        let priorities: Vec<String> = (0..4).map(|_| map(&j.entry())["PRIORITY"].into()).collect();
        assert_eq!(priorities, ["3", "4", "6", "7"]);
        j.nothing_more();

        j.log(|| tracing::error!(subscription = %"a/1", provider = %"b", "e"));
        let entry = j.entry();
        let providers: Vec<&str> = entry
            .iter()
            .filter(|(k, _)| k == "PROVIDER")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(providers, ["b"], "{entry:?}");
    }

    #[test]
    fn a_multiline_message_uses_the_length_prefixed_form() {
        let j = FakeJournal::new();
        j.log(|| tracing::error!(key = %"a\nb", "invalid config:\nline two"));
        let entry = j.entry();
        let f = map(&entry);
        assert_eq!(f["MESSAGE"], "invalid config:\nline two key=a\nb");
        assert_eq!(f["KEY"], "a\nb");
        assert_eq!(f["PRIORITY"], "3");
    }

    #[test]
    fn an_entry_too_big_for_a_datagram_goes_in_a_memfd() {
        let j = FakeJournal::new();
        let big = "x".repeat(1 << 20);
        j.log(|| tracing::warn!(subscription = %"a/1", "{big}"));
        let (entry, memfd) = j.entry_and_how();
        assert!(memfd, "sent as a datagram");
        let f = map(&entry);
        assert_eq!(f["MESSAGE"].len(), big.len() + " subscription=a/1".len());
        assert_eq!(f["SUBSCRIPTION"], "a/1");
        assert_eq!(f["PRIORITY"], "4");
    }

    #[test]
    fn a_dash_for_none_is_no_field() {
        let j = FakeJournal::new();
        j.log(|| tracing::warn!(subscription = %"a/1", rotation = "-", "failed"));
        let entry = j.entry();
        let f = map(&entry);
        assert!(!f.contains_key("ROTATION"), "{entry:?}");
        assert_eq!(f["MESSAGE"], "failed subscription=a/1 rotation=\"-\"");
    }

    #[test]
    fn field_names_become_journal_names() {
        assert_eq!(journal_name("subscription"), "SUBSCRIPTION");
        assert_eq!(journal_name("vault_path"), "VAULT_PATH");
        assert_eq!(journal_name("state"), "PHASE");
        assert_eq!(journal_name("priority"), "REKEY_PRIORITY");
        assert_eq!(journal_name("message_id"), "REKEY_MESSAGE_ID");
        assert_eq!(journal_name("a.b"), "A_B");
        assert_eq!(journal_name("_x"), "REKEY__X");
    }

    #[test]
    fn no_socket_is_an_error_so_the_caller_logs_to_stderr() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Journald::open(&dir.path().join("none")).is_err());
        std::fs::write(dir.path().join("file"), "").unwrap();
        assert!(Journald::open(&dir.path().join("file")).is_err());
    }
}
