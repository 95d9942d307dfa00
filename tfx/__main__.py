from tfx.cli import main

main()
