"""infmllm-chat: a video through a session with an HF-directory model, answers with sightings, clear exits."""

import json

import cv2
import pytest
from test_vlm_families import frame

from infmllm_ros.bench.random_models import build_random_checkpoint
from infmllm_ros.tools.chat import main


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 6 s, 10 fps clip: one scene per second (so frames differ every second)."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (160, 120))
    for i in range(60):
        w.write(frame(i // 10)[:, :, ::-1].copy())
    w.release()
    return path


@pytest.mark.parametrize(
    "shape,backend", [("qwen2.5-vl-tiny", "torch"), ("smolvlm2-tiny", "torch"), ("qwen2.5-vl-tiny", "onnxruntime")]
)
def test_chat_streams_a_video_and_answers_each_question(shape, backend, clip, tmp_path, capsys):
    model = build_random_checkpoint(shape, tmp_path / "model")
    out = tmp_path / "chat.json"
    rc = main(
        [
            "--model",
            str(model),
            "--video",
            str(clip),
            "--fps",
            "2",
            "--capacity",
            "512",
            "--question",
            "What was seen?",
            "--question",
            "When?",
            "--max-new-tokens",
            "6",
            "--backend",
            backend,
            "--engine-dir",
            str(tmp_path / "engines"),
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    assert len(list((tmp_path / "engines").glob("*.onnx"))) == (3 if backend == "onnxruntime" else 0)
    report = json.loads(out.read_text())
    assert [f["t"] for f in report["frames"]] == pytest.approx([0.5 * i for i in range(12)])
    assert report["frames"][0]["stored"] and sum(f["novel"] for f in report["frames"]) >= 3
    assert [a["question"] for a in report["answers"]] == ["What was seen?", "When?"]
    assert all(a["sightings"] and 0 <= a["sightings"][0]["t"] <= 5.5 for a in report["answers"])
    printed = capsys.readouterr().out
    assert printed.count("Q: ") == 2 and "sightings: t=" in printed


def test_chat_exits_2_with_the_reason_for_bad_input(clip, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"]}))
    cut = build_random_checkpoint("smolvlm2-tiny", tmp_path / "cut")
    (cut / "model.safetensors").write_bytes((cut / "model.safetensors").read_bytes()[:64])
    for argv, reason in (
        (["--model", str(tmp_path)], "FooForCausalLM"),
        (["--model", str(cut)], f"weight file {cut / 'model.safetensors'} cannot be read"),
        (["--video", str(tmp_path / "none.mp4")], "video not found"),
        (["--fps", "0"], "--fps must be > 0"),
    ):
        base = {"--model": "smollm2-135m", "--video": str(clip)}
        base.update(dict(zip(argv[::2], argv[1::2])))
        args = [x for kv in base.items() for x in kv] + ["--question", "Anything?"]
        assert main(args) == 2
        assert reason in capsys.readouterr().err


def test_chat_takes_images_one_per_frame_interval(tmp_path, capsys):
    model = build_random_checkpoint("smolvlm2-tiny", tmp_path / "model")
    images = []
    for i in range(3):
        images += ["--image", str(tmp_path / f"{i}.png")]
        cv2.imwrite(images[-1], frame(i)[:, :, ::-1].copy())
    out = tmp_path / "chat.json"
    assert (
        main(
            [
                "--model",
                str(model),
                *images,
                "--fps",
                "0.5",
                "--capacity",
                "512",
                "--question",
                "What?",
                "--max-new-tokens",
                "3",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert [f["t"] for f in json.loads(out.read_text())["frames"]] == [0.0, 2.0, 4.0]
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert main(["--model", str(model), "--image", str(tmp_path / "bad.png"), "--question", "What?"]) == 2
    assert "cannot decode" in capsys.readouterr().err
