use super::*;
use std::io::Write;

fn hello(cap: usize) -> Hello {
    Hello::new("test", "u64 numbers", cap)
}

/// A listener on a free loopback port, and a sender connected to it, with its receiver.
fn pair(cap: usize) -> (RemoteTx<u64>, RemoteRx<u64>) {
    let l = RemoteListener::bind("127.0.0.1:0").unwrap();
    let addr = l.addr().to_string();
    let rx = std::thread::spawn(move || l.accept::<u64>(&hello(cap)).unwrap());
    let tx = RemoteTx::connect(&addr, &hello(99)).unwrap();
    (tx, rx.join().unwrap())
}

#[test]
fn messages_arrive_in_order_and_whole_over_tcp_and_unix() {
    let (tx, rx) = pair(4);
    for i in 0..100u64 {
        tx.send(&(i * 3)).unwrap();
        assert_eq!(rx.recv().unwrap(), i * 3);
    }
    assert_eq!(tx.sent_bytes(), rx.received_bytes());
    assert!(tx.sent_bytes() >= 100);

    let path = std::env::temp_dir().join(format!("weir-edge-test-{}.sock", std::process::id()));
    let addr = format!("unix:{}", path.display());
    let l = RemoteListener::bind(&addr).unwrap();
    let t = std::thread::spawn(move || l.accept::<Vec<String>>(&Hello::new("test", "lists", 2)).unwrap());
    let tx = RemoteTx::<Vec<String>>::connect(&addr, &Hello::new("test", "lists", 2)).unwrap();
    let rx = t.join().unwrap();
    let msg = vec!["a".to_string(), "ü".repeat(10_000)];
    tx.send(&msg).unwrap();
    assert_eq!(rx.recv().unwrap(), msg);
    drop(tx);
    assert!(matches!(rx.recv(), Err(RemoteError::Closed { peer }) if peer.starts_with(&addr)));
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_slow_receiver_stalls_the_sender_within_its_capacity() {
    let (tx, rx) = pair(3);
    assert_eq!(tx.capacity(), 3);
    for i in 0..3 {
        tx.send(&i).unwrap();
    }
    assert!(!tx.has_room(), "three messages unconsumed use the three credits");
    let tx = Arc::new(tx);
    let t2 = tx.clone();
    let fourth = std::thread::spawn(move || t2.send(&3));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!fourth.is_finished(), "the fourth send waits for a credit");
    assert_eq!(rx.recv().unwrap(), 0);
    fourth.join().unwrap().unwrap();
    for want in 1..4 {
        assert_eq!(rx.recv().unwrap(), want);
    }
    // A receiver that never takes: the sender gives up after its patience, naming the stall.
    let (tx, _rx) = pair(1);
    let tx = tx.with_patience(Duration::from_millis(100));
    tx.send(&1).unwrap();
    assert!(matches!(tx.send(&2), Err(RemoteError::Stalled { .. })));
}

/// A raw client: the handshake done, the socket to write frames by hand.
fn raw_client(cap: usize) -> (Stream, RemoteRx<u64>) {
    let l = RemoteListener::bind("127.0.0.1:0").unwrap();
    let addr = l.addr().to_string();
    let rx = std::thread::spawn(move || l.accept::<u64>(&hello(cap)));
    let mut s = Stream::connect(&addr).unwrap();
    frame::write_msg(&mut s, Kind::Hello, &hello(1), &addr).unwrap();
    let _: Hello = frame::read_msg(&mut s, Kind::Hello, &addr).unwrap();
    (s, rx.join().unwrap().unwrap())
}

fn data_frame(v: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    frame::write_frame(&mut buf, Kind::Data, &bincode::encode_to_vec(v, config()).unwrap(), "").unwrap();
    buf
}

#[test]
fn corrupt_truncated_oversized_and_overrunning_frames_are_refused_by_name() {
    // A flipped bit in the payload.
    let (mut s, rx) = raw_client(2);
    let mut f = data_frame(7);
    s.write_all(&data_frame(6)).unwrap();
    *f.last_mut().unwrap() ^= 1;
    s.write_all(&f).unwrap();
    assert_eq!(rx.recv().unwrap(), 6, "what came before the bad frame is kept");
    let e = rx.recv().unwrap_err();
    assert!(matches!(e, RemoteError::Checksum { .. }), "{e}");
    assert!(e.to_string().contains("checksum"), "{e}");
    assert_eq!(rx.recv().unwrap_err(), e, "the end is kept");

    // Half a frame, then the connection closes.
    let (mut s, rx) = raw_client(2);
    let f = data_frame(1 << 40);
    s.write_all(&f[..f.len() - 2]).unwrap();
    s.shutdown().unwrap();
    let e = rx.recv().unwrap_err();
    assert!(matches!(e, RemoteError::Truncated { got, want, .. } if got == f.len() - 2 && want == f.len()), "{e}");
    assert!(e.to_string().contains("closed mid-frame"), "{e}");

    // A length beyond the limit: refused before anything is allocated.
    let (mut s, rx) = raw_client(2);
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    s.write_all(&[0; 5]).unwrap();
    assert!(matches!(rx.recv().unwrap_err(), RemoteError::TooLong { len, .. } if len == u32::MAX as usize));

    // More messages than credits.
    let (mut s, rx) = raw_client(2);
    for v in 0..4 {
        s.write_all(&data_frame(v)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(rx.recv().unwrap(), 0);
    assert_eq!(rx.recv().unwrap(), 1);
    let e = rx.recv().unwrap_err();
    assert!(e.to_string().contains("more than its 2 credits"), "{e}");
}

#[test]
fn a_peer_of_another_version_edge_or_fingerprint_is_refused() {
    let cases: [(Hello, &str); 3] = [
        (Hello { version: PROTOCOL_VERSION + 1, ..hello(1) }, "protocol version"),
        (Hello::new("other", "u64 numbers", 1), "edge"),
        (Hello::new("test", "f32 numbers", 1), "fingerprint"),
    ];
    for (theirs, what) in cases {
        let l = RemoteListener::bind("127.0.0.1:0").unwrap();
        let addr = l.addr().to_string();
        let rx = std::thread::spawn(move || l.accept::<u64>(&hello(1)).map(|_| ()));
        let tx = RemoteTx::<u64>::connect(&addr, &theirs);
        let e = tx.err().expect("the sender refuses");
        assert!(e.to_string().contains(what), "{e}");
        let e = rx.join().unwrap().unwrap_err();
        assert!(e.to_string().contains(what), "{e}");
    }
    // Not a weir edge at all: an HTTP client.
    let l = RemoteListener::bind("127.0.0.1:0").unwrap();
    let addr = l.addr().to_string();
    let rx = std::thread::spawn(move || l.accept::<u64>(&hello(1)).map(|_| ()));
    let mut s = Stream::connect(&addr).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    s.shutdown().unwrap();
    let e = rx.join().unwrap().unwrap_err();
    assert!(
        matches!(e, RemoteError::TooLong { .. } | RemoteError::Truncated { .. } | RemoteError::Checksum { .. }),
        "{e}"
    );
}

#[test]
fn serve_hands_every_senders_messages_to_the_handler() {
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    let server = serve::<u64, _>(RemoteListener::bind("127.0.0.1:0").unwrap(), hello(2), move |_, m| {
        g.lock().unwrap().push(m.map_err(|e| matches!(e, RemoteError::Closed { .. })));
    })
    .unwrap();
    let senders: Vec<_> = (0..3u64)
        .map(|k| {
            let addr = server.addr().to_string();
            std::thread::spawn(move || {
                let tx = RemoteTx::<u64>::connect(&addr, &hello(1)).unwrap();
                for i in 0..50 {
                    tx.send(&(k * 1000 + i)).unwrap();
                }
            })
        })
        .collect();
    senders.into_iter().for_each(|t| t.join().unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.lock().unwrap().len() < 153 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let got = got.lock().unwrap();
    let mut values: Vec<u64> = got.iter().filter_map(|m| m.ok()).collect();
    values.sort_unstable();
    let want: Vec<u64> = (0..3).flat_map(|k| (0..50).map(move |i| k * 1000 + i)).collect();
    assert_eq!(values, want);
    assert_eq!(got.iter().filter(|m| **m == Err(true)).count(), 3, "each sender's goodbye, as a clean end");
    server.shutdown();
}

#[test]
fn credits_and_arrivals_are_polled_without_blocking() {
    let listener = RemoteListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.addr().to_string();
    let hellos = [Hello::new("a", "fp", 1), Hello::new("b", "fp", 2)];
    let h =
        std::thread::spawn(move || listener.accept_any_until::<u32>(&hellos, Instant::now() + Duration::from_secs(5)));
    let tx = RemoteTx::<u32>::connect(&addr, &Hello::new("b", "fp", 1)).unwrap();
    let (which, rx) = h.join().unwrap().unwrap().expect("a sender came");
    assert_eq!(which, 1, "the hello of the edge the sender named");
    assert_eq!(tx.capacity(), 2);
    // Nothing yet: no message, and a waker registered.
    let lane = crate::pool::LaneWaker::detached();
    assert!(rx.try_recv().is_none() && !rx.has_message());
    rx.notify_on_arrival(&lane);
    tx.send(&7).unwrap();
    tx.send(&8).unwrap();
    // Out of credits: not ready, never blocked.
    assert!(!tx.has_room());
    tx.notify_on_credit(&lane);
    let t = Instant::now();
    while !rx.has_message() {
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::yield_now();
    }
    assert_eq!(rx.try_recv().unwrap().unwrap(), 7);
    let t = Instant::now();
    while !tx.has_room() {
        assert!(t.elapsed() < Duration::from_secs(5), "the credit came back");
        std::thread::yield_now();
    }
    // The second message may still be on its way: it arrives without anyone blocking.
    let t = Instant::now();
    let second = loop {
        if let Some(m) = rx.try_recv() {
            break m;
        }
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::yield_now();
    };
    assert_eq!(second.unwrap(), 8);
    drop(tx);
    let t = Instant::now();
    let end = loop {
        if let Some(r) = rx.try_recv() {
            break r;
        }
        assert!(t.elapsed() < Duration::from_secs(5));
        std::thread::yield_now();
    };
    assert!(matches!(end, Err(RemoteError::Closed { .. })));
    assert!(matches!(rx.ended(), Some(RemoteError::Closed { .. })));
}

#[test]
fn a_listener_with_no_sender_gives_up_at_its_deadline_and_refuses_an_unknown_edge() {
    let listener = RemoteListener::bind("127.0.0.1:0").unwrap();
    let hellos = [Hello::new("a", "fp", 1)];
    let got = listener.accept_any_until::<u32>(&hellos, Instant::now() + Duration::from_millis(50)).unwrap();
    assert!(got.is_none());
    let addr = listener.addr().to_string();
    let h = std::thread::spawn(move || RemoteTx::<u32>::connect(&addr, &Hello::new("zzz", "fp", 1)).err());
    let err = listener.accept_any_until::<u32>(&hellos, Instant::now() + Duration::from_secs(5)).err().unwrap();
    assert!(err.to_string().contains("zzz"), "{err}");
    assert!(h.join().unwrap().unwrap().to_string().contains("edge"));
}
