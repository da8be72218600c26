from puma_onnx.cli import main

main(prog_name="puma-onnx")
