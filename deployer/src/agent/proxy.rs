//! The routing proxy: every node accepts an application's external port and forwards each
//! connection to wherever the application runs, as Flocker's routing did. The table can be
//! replaced at any time; connections already open keep their old target.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::api::Route;

pub struct Proxy {
    bind: IpAddr,
    /// external port → target, or `None` while the route is held.
    table: Arc<Mutex<HashMap<u16, Option<SocketAddr>>>>,
    listeners: Mutex<HashMap<u16, JoinHandle<()>>>,
}

impl Proxy {
    pub fn new(bind: IpAddr) -> Proxy {
        Proxy {
            bind,
            table: Arc::default(),
            listeners: Mutex::default(),
        }
    }

    /// Replaces the routing table, opening and closing listeners as needed.
    pub async fn set_routes(&self, routes: &[Route]) -> Result<(), String> {
        let wanted: HashMap<u16, Option<SocketAddr>> = routes
            .iter()
            .map(|r| (r.external, (!r.hold).then_some(r.target)))
            .collect();
        if let Ok(mut t) = self.table.lock() {
            *t = wanted.clone();
        }
        let missing: Vec<u16> = {
            let Ok(mut l) = self.listeners.lock() else {
                return Err("proxy state poisoned".into());
            };
            l.retain(|port, task| {
                let keep = wanted.contains_key(port);
                if !keep {
                    task.abort();
                }
                keep
            });
            wanted
                .keys()
                .filter(|p| !l.contains_key(p))
                .copied()
                .collect()
        };
        for port in missing {
            let addr = SocketAddr::new(self.bind, port);
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("routing proxy cannot listen on {addr}: {e}"))?;
            let table = self.table.clone();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(forward(client, table.clone(), port));
                }
            });
            if let Ok(mut l) = self.listeners.lock() {
                l.insert(port, task);
            }
        }
        Ok(())
    }
}

/// Longest a connection is held while its application moves.
const HOLD_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

async fn forward(
    mut client: TcpStream,
    table: Arc<Mutex<HashMap<u16, Option<SocketAddr>>>>,
    port: u16,
) {
    let started = std::time::Instant::now();
    let target = loop {
        match table.lock().ok().and_then(|t| t.get(&port).copied()) {
            Some(Some(target)) => break target,
            Some(None) if started.elapsed() < HOLD_LIMIT => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            _ => return,
        }
    };
    match TcpStream::connect(target).await {
        Ok(mut upstream) => {
            // A relay must not add Nagle's delay to what the two ends already decided.
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
        Err(e) => tracing::warn!(%target, "routing: cannot reach the application: {e}"),
    }
}
