"""RecBole's distributed path (``run_recbole --nproc``) on CPUs: a gloo process group instead of NCCL
(recbole_vlm2rec/compat/distributed.py), two processes on this machine's cores."""
import glob
import socket

from helpers import FIXTURES, run_cli, write_tiny_multimodal_dataset


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sasrec_trains_and_tests_with_two_cpu_processes(tmp_path):
    done = run_cli(["--model=SASRec", "--dataset=tiny-seq", f"--data_path={FIXTURES}",
                    f"--config_files={FIXTURES / 'tiny-seq.yaml'}", "--nproc=2", "--gpu_id=", "--epochs=2",
                    f"--port={_free_port()}", f"--checkpoint_dir={tmp_path / 'saved'}"], cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count("test result:") == 1  # rank 0 reports, as RecBole does on GPUs
    checkpoints = glob.glob(str(tmp_path / "saved" / "SASRec-*.pth"))
    assert len(checkpoints) == 1  # one name for every rank, written once, read back by both after fit


def test_vlm2rec_trains_tests_and_exports_once_with_two_cpu_processes(tmp_path):
    write_tiny_multimodal_dataset(tmp_path / "data")
    done = run_cli(["--model=VLM2Rec", "--dataset=tiny-mm", f"--data_path={tmp_path / 'data'}",
                    f"--config_files={FIXTURES / 'vlm2rec-tiny.yaml'}", "--nproc=2", "--gpu_id=", "--epochs=1",
                    f"--port={_free_port()}", f"--checkpoint_dir={tmp_path / 'saved'}"], cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count("test result:") == 1 and output.count("exported:") == 1
    assert "no cross-device negatives yet" in output  # said, not hidden
    (checkpoint,) = glob.glob(str(tmp_path / "saved" / "VLM2Rec-*.pth"))
    assert glob.glob(checkpoint[:-4] + "/item_embeddings.text.npy")
