//! `kvstore`: the example stateful application the deployer ships.
//!
//! A key-value store over TCP, one command per line:
//! `SET key value` → `OK` (only after the write is on disk: appended to `DATA/kv.log` and
//! fdatasync'ed), `GET key` → `VALUE value` or `NONE`, `COUNT` → `COUNT n`, `PING` → `PONG`.
//! On start it replays the log (a torn last line from a crash is ignored), so every
//! acknowledged write survives a restart — and a move to another node.
//!
//! Where it listens and keeps data: `--listen` / `--data`, defaulting to what the deployer's
//! runtimes provide (`DEPLOYER_LISTEN_7000`, `DEPLOYER_VOLUME`), else `0.0.0.0:7000` and `/data`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

struct Store {
    map: HashMap<String, String>,
    log: File,
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
    Ok(Store { map, log })
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
