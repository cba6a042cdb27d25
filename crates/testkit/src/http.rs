//! Probing a daemon's HTTP status listener: one `GET` per connection (HTTP/1.0, so the reply
//! is never chunked), and reading a value out of its `/metrics` text.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::time::Instant;

/// How long connecting may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long reading the whole reply may take.
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// How often [`get_until`] asks.
const POLL: Duration = Duration::from_millis(20);

/// One HTTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The status line and headers as sent.
    pub head: String,
    /// The body.
    pub body: String,
}

/// `GET path` on `addr`; `None` when the daemon cannot be reached or the reply is not HTTP
/// (a reply still coming after 3 s is returned as far as it came).
pub async fn get(addr: impl ToSocketAddrs, path: &str) -> Option<Reply> {
    let mut s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(READ_TIMEOUT, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some(Reply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    })
}

/// `GET path` on `addr` every 20 ms until a reply satisfies `pred`; that reply, or `None`
/// when none did within `within`.
pub async fn get_until(
    addr: impl ToSocketAddrs + Copy,
    path: &str,
    within: Duration,
    mut pred: impl FnMut(&Reply) -> bool,
) -> Option<Reply> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(r) = get(addr, path).await
            && pred(&r)
        {
            return Some(r);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The body of `GET path` on `addr` (empty when it failed).
pub async fn get_body(addr: impl ToSocketAddrs, path: &str) -> String {
    get(addr, path).await.map(|r| r.body).unwrap_or_default()
}

/// Sum of the samples of Prometheus family `name` (e.g. `hintfed_rejects_total`) whose
/// labels contain every one of `labels` (e.g. `reason="bad_mac"`), in a `/metrics` text.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next())
        .filter_map(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_the_samples_of_one_family_with_the_labels() {
        let text = "# TYPE hintfed_rejects_total counter\n\
            hintfed_rejects_total{reason=\"bad_mac\",peer=\"a\"} 2\n\
            hintfed_rejects_total{reason=\"bad_mac\",peer=\"b\"} 3\n\
            hintfed_rejects_total{reason=\"oversize\"} 7\n\
            hintfed_rejects_total_created 1.7e9\n\
            hintfed_up 1\n";
        assert_eq!(
            metric(text, "hintfed_rejects_total", &["reason=\"bad_mac\""]),
            5
        );
        assert_eq!(metric(text, "hintfed_rejects_total", &[]), 12);
        assert_eq!(metric(text, "hintfed_up", &[]), 1);
        assert_eq!(metric(text, "hintfed_down", &[]), 0);
    }

    #[tokio::test]
    async fn gets_status_head_and_body() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut req = vec![0u8; 1024];
            let n = s.read(&mut req).await.expect("read");
            assert!(req[..n].starts_with(b"GET /readyz HTTP/1.0\r\n"));
            s.write_all(b"HTTP/1.0 503 Service Unavailable\r\nX-A: b\r\n\r\nnot ready\n")
                .await
                .expect("write");
        });
        let r = get(addr, "/readyz").await.expect("reply");
        server.await.expect("server");
        assert_eq!((r.status, r.body.as_str()), (503, "not ready\n"));
        assert!(r.head.contains("X-A: b"));
        assert_eq!(
            get_body(("127.0.0.1", crate::net::free_port()), "/").await,
            ""
        );
    }
}
