A left walk (not a scan) runs off the tape inside compiled code
>+[<+<+]
