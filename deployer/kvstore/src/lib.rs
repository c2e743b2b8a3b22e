//! `kvstore`: the example stateful application the deployer ships.
//!
//! A key-value store over TCP, one command per line:
//! `SET key value` → `OK` (only after the write is on disk: appended to `DATA/kv.log` and
//! fdatasync'ed), `GET key` → `VALUE value` or `NONE`, `COUNT` → `COUNT n`, `PING` → `PONG`.
//! On start it replays the log (a torn last line from a crash is ignored), so every
//! acknowledged write survives a restart — and a move to another node.
//!
//! If `DATA/table.db` exists, each `SET` also writes its value over one page of it (the
//! key's hash picks the page), without syncing, as a database writes its table pages
//! beside its log: the log stays the record that counts, and the table is a big file with
//! scattered small changes, which is what a migration's final delta of a real database
//! carries. The migration bench creates one (`--table-mib`).
//!
//! Where it listens and keeps data: `--listen` / `--data`, defaulting to what the deployer's
//! runtimes provide (`DEPLOYER_LISTEN_7000`, `DEPLOYER_VOLUME`), else `0.0.0.0:7000` and `/data`.
//!
//! `kvstore ping` exits 0 once the store on this host answers (a health check).
//!
//! `KVSTORE_WARMUP_MS` makes it wait that long after replaying its log before it listens, as
//! a database recovering its journal or a search engine opening its shards does: the time
//! during which a port published by Docker already accepts connections and the application
//! behind it does not.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

struct Store {
    map: HashMap<String, String>,
    log: File,
    dir: PathBuf,
    /// `DATA/table.db`, once there is one (looked for at each `SET` until then).
    table: Option<File>,
}

/// Bytes of one table page.
pub const PAGE: u64 = 16 * 1024;

/// Writes `value` (cut or padded to a page) over the page of `table` that `key` picks.
fn write_page(table: &File, key: &str, value: &str) -> std::io::Result<()> {
    use std::hash::{Hash, Hasher};
    use std::os::unix::fs::FileExt;
    let pages = table.metadata()?.len() / PAGE;
    if pages == 0 {
        return Ok(());
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    let mut page = value.as_bytes().to_vec();
    page.resize(PAGE as usize, b' ');
    table.write_all_at(&page, h.finish() % pages * PAGE)
}

fn open(dir: &Path) -> std::io::Result<Store> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("kv.log");
    let mut map = HashMap::new();
    if let Ok(f) = File::open(&path) {
        let mut valid = 0u64;
        for line in BufReader::new(f).split(b'\n') {
            let line = line?;
            // Only complete lines count; a torn tail is cut off below.
            let Ok(text) = String::from_utf8(line.clone()) else {
                break;
            };
            let Some((k, v)) = text.split_once(' ') else {
                break;
            };
            map.insert(k.to_string(), v.to_string());
            valid += line.len() as u64 + 1;
        }
        let f = OpenOptions::new().write(true).open(&path)?;
        if f.metadata()?.len() != valid {
            f.set_len(valid)?;
            f.sync_all()?;
        }
    }
    let log = OpenOptions::new().create(true).append(true).open(&path)?;
    Ok(Store {
        map,
        log,
        dir: dir.to_path_buf(),
        table: None,
    })
}

fn serve(stream: TcpStream, store: Arc<Mutex<Store>>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut out = stream.try_clone()?;
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let mut parts = line.splitn(3, ' ');
        let reply = match (parts.next(), parts.next(), parts.next()) {
            (Some("SET"), Some(k), Some(v)) if !k.is_empty() && !v.contains('\n') => {
                let mut s = store
                    .lock()
                    .map_err(|_| std::io::Error::other("poisoned"))?;
                s.log.write_all(format!("{k} {v}\n").as_bytes())?;
                s.log.sync_data()?;
                if s.table.is_none() {
                    s.table = OpenOptions::new()
                        .write(true)
                        .open(s.dir.join("table.db"))
                        .ok();
                }
                if let Some(table) = &s.table {
                    write_page(table, k, v)?;
                }
                s.map.insert(k.to_string(), v.to_string());
                "OK".to_string()
            }
            (Some("GET"), Some(k), None) => {
                let s = store
                    .lock()
                    .map_err(|_| std::io::Error::other("poisoned"))?;
                match s.map.get(k) {
                    Some(v) => format!("VALUE {v}"),
                    None => "NONE".to_string(),
                }
            }
            (Some("COUNT"), None, None) => {
                let s = store
                    .lock()
                    .map_err(|_| std::io::Error::other("poisoned"))?;
                format!("COUNT {}", s.map.len())
            }
            (Some("PING"), None, None) => "PONG".to_string(),
            _ => "ERR usage: SET key value | GET key | COUNT | PING".to_string(),
        };
        // One write per reply: two small ones would meet Nagle's algorithm and the peer's
        // delayed ACK, 40 ms per request.
        out.write_all(format!("{reply}\n").as_bytes())?;
    }
    Ok(())
}

/// Serves the store in `data` on `listen` until the process ends.
pub fn run(listen: &str, data: &Path) -> Result<(), String> {
    let store = open(data).map_err(|e| format!("{}: {e}", data.display()))?;
    let store = Arc::new(Mutex::new(store));
    if let Some(ms) = std::env::var("KVSTORE_WARMUP_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        eprintln!("kvstore: warming up for {ms} ms");
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let listener =
        TcpListener::bind(listen).map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    eprintln!("kvstore: listening on {listen}, data in {}", data.display());
    for stream in listener.incoming().flatten() {
        let store = store.clone();
        std::thread::spawn(move || {
            let _ = serve(stream, store);
        });
    }
    Ok(())
}

/// `kvstore ping`: asks the store on this host (where [`settings`] says it listens) for
/// `PONG`; what a container image's `HEALTHCHECK` runs.
pub fn ping(args: &[String]) -> Result<(), String> {
    use std::io::Read;
    let (listen, _) = settings(args)?;
    let port = listen
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .ok_or_else(|| format!("no port in {listen}"))?;
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let timeout = std::time::Duration::from_secs(1);
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.write_all(b"PING\n"))
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut answer = [0u8; 5];
    s.read_exact(&mut answer)
        .map_err(|e| format!("{addr}: {e}"))?;
    if &answer == b"PONG\n" {
        Ok(())
    } else {
        Err(format!("{addr}: unexpected answer"))
    }
}

/// Where to listen and keep data: flags, else the deployer runtimes' environment, else
/// `0.0.0.0:7000` and `/data`.
pub fn settings(args: &[String]) -> Result<(String, PathBuf), String> {
    let mut listen =
        std::env::var("DEPLOYER_LISTEN_7000").unwrap_or_else(|_| "0.0.0.0:7000".into());
    let mut data =
        PathBuf::from(std::env::var("DEPLOYER_VOLUME").unwrap_or_else(|_| "/data".into()));
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--listen", Some(v)) => listen = v.clone(),
            ("--data", Some(v)) => data = PathBuf::from(v),
            _ => return Err("usage: kvstore [--listen ADDR] [--data DIR]".into()),
        }
    }
    Ok((listen, data))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a panic is the failure report
    use super::*;

    #[test]
    fn a_set_writes_its_value_over_one_page_of_the_table() {
        let dir = std::env::temp_dir().join(format!("kvstore-table-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("table.db");
        std::fs::write(&path, vec![0u8; 8 * PAGE as usize]).unwrap();
        let table = OpenOptions::new().write(true).open(&path).unwrap();
        write_page(&table, "k", "value").unwrap();
        write_page(&table, "k", "again").unwrap();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 8 * PAGE as usize, "the table keeps its size");
        let written: Vec<&[u8]> = data
            .chunks(PAGE as usize)
            .filter(|p| p.iter().any(|&b| b != 0))
            .collect();
        assert_eq!(written.len(), 1, "one key, one page");
        assert!(written[0].starts_with(b"again "));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
