from hotcold.cli import main

main()
