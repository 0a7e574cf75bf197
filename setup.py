"""ament_python package setup for infmllm_ros (also a plain pip-installable package)."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "infmllm_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    package_data={f"{PACKAGE}.models": ["imagenet_concepts.json"]},  # WordNet closure of ImageNet classes
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", glob("config/*")),
        (f"share/{PACKAGE}/cuda", glob("cuda/*")),
    ],
    install_requires=["setuptools"],
    zip_safe=False,  # models/concepts.py reads its JSON beside the module
    maintainer="infmllm_ros developers",
    maintainer_email="dev@infmllm-ros.invalid",
    description="Streaming multimodal LLM memory with an Inf-MLLM fixed-size KV cache for ROS 2.",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "infmllm-bench-ppl = infmllm_ros.bench.perplexity:main",
            "infmllm-bench-needle = infmllm_ros.bench.needle:main",
            "infmllm-bench-kernels = infmllm_ros.bench.kernels:main",
            "infmllm-bench-backends = infmllm_ros.bench.backends:main",
            "infmllm-bench-decode = infmllm_ros.bench.decode:main",
            "infmllm-bench-stream = infmllm_ros.bench.stream:main",
            "infmllm-bench-calibrate = infmllm_ros.bench.calibrate:main",
            "infmllm-bench-limits = infmllm_ros.bench.limits:main",
            "infmllm-build-engines = infmllm_ros.engines.build:main",
            "infmllm-node = infmllm_ros.ros.node:main",
            "infmllm_node = infmllm_ros.ros.node:main",
            "infmllm-ask = infmllm_ros.tools.ask:main",
            "infmllm-make-bag = infmllm_ros.tools.bag:main",
            "infmllm-replay = infmllm_ros.tools.replay:main",
            "infmllm-demo = infmllm_ros.tools.demo:main",
            "infmllm-chat = infmllm_ros.tools.chat:main",
            "infmllm-random-checkpoint = infmllm_ros.bench.random_models:main",
        ],
    },
)
