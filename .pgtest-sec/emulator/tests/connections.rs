//! The emulator answers every connection, however many arrive at once and however many stay
//! open: a request that waits for the client's timeout looks to certyo_cdc like an outage.

use certyo_emulator::{Config, Emulator};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One `GET /_emulator/stats` on an open connection, kept open afterwards (keep-alive); the
/// status line, or the error that ended the wait.
fn ask(stream: &mut BufReader<TcpStream>) -> Result<String, String> {
    let request = "GET /_emulator/stats HTTP/1.1\r\nHost: emulator\r\n\r\n";
    stream
        .get_mut()
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut status = String::new();
    stream
        .read_line(&mut status)
        .map_err(|e| format!("no answer: {e}"))?;
    let mut length = 0;
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).map_err(|e| e.to_string())?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().map_err(|_| line.clone())?;
            }
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(status.trim_end().to_string())
}

#[test]
fn bursts_of_new_connections_are_answered_while_earlier_ones_stay_open() {
    let emulator = Emulator::start(Config::default()).unwrap();
    let address = emulator.url().trim_start_matches("http://").to_string();
    let mut open = Vec::new();
    for burst in 0..12 {
        // Eight connections at once, as a worker's verification and delivery threads open
        // theirs, while connections of the earlier bursts stay open and idle.
        let streams: Vec<_> = (0..8)
            .map(|_| {
                let stream = TcpStream::connect(&address).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                BufReader::new(stream)
            })
            .collect();
        let answers: Vec<_> = std::thread::scope(|scope| {
            let asked: Vec<_> = streams
                .into_iter()
                .map(|mut stream| {
                    scope.spawn(move || {
                        let answer = ask(&mut stream);
                        (answer, stream)
                    })
                })
                .collect();
            asked.into_iter().map(|t| t.join().unwrap()).collect()
        });
        for (i, (answer, stream)) in answers.into_iter().enumerate() {
            assert_eq!(
                answer.as_deref(),
                Ok("HTTP/1.1 200 OK"),
                "burst {burst}, connection {i}, with {} connections open",
                open.len()
            );
            // Half of them are closed again: a server that keeps a thread per connection
            // has idle threads then, and the next burst races for them.
            if i % 2 == 0 {
                open.push(stream);
            }
        }
    }
    // And each of them still answers.
    for (i, stream) in open.iter_mut().enumerate() {
        assert_eq!(
            ask(stream).as_deref(),
            Ok("HTTP/1.1 200 OK"),
            "connection {i}"
        );
    }
}
