from lit_gpt_char.cli import main

main()
