from puma_onnx.cli import main

main()
