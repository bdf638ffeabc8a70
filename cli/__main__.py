from attncache_cli.main import main

main()
