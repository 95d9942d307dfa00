from tfx.cli.app import main

main()
