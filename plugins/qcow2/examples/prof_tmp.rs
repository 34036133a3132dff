use qcow2::image::Image;
use std::process::Command;
use std::time::Instant;
fn main() {
    let fresh = std::env::args().nth(1).as_deref() == Some("fresh");
    for _ in 0..3 {
        let p = std::path::Path::new("/tmp/qcow2g/p.qcow2");
        let _ = std::fs::remove_file(p);
        assert!(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "256M"])
            .status()
            .unwrap()
            .success());
        if !fresh {
            Command::new("qemu-io")
                .args([
                    "-f",
                    "qcow2",
                    "-c",
                    "write -P 0x5a 0 256M",
                    p.to_str().unwrap(),
                ])
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
        }
        let img = Image::open(p, false, &[]).unwrap();
        let buf = vec![0x33u8; 1 << 20];
        let t = Instant::now();
        for i in 0..256u64 {
            img.write_at(i << 20, &buf).unwrap();
        }
        let w = t.elapsed();
        img.flush().unwrap();
        println!("writes {:?} flush {:?}", w, t.elapsed() - w);
    }
}
