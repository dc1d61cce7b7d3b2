# NOTE: dgemma._C is loaded into a process that already runs torch's shared C++ runtime (libstdc++.so.6,
# libgcc_s.so.1). A module carrying its own static copy has a second set of iostream/locale and
# exception-handling state, and formatting an error message or throwing through it crashes the process.
# Some toolchains link the runtime statically (a compiler named by CXX/CUDAHOSTCXX, -static-libstdc++ in
# LDFLAGS). So the runtime libraries the interpreter itself loads are named explicitly, ahead of whatever
# the compiler driver adds: the linker binds each reference to the first library that defines it, so a
# static archive the driver appends later contributes nothing (at most the symbols a newer compiler's
# headers need that the interpreter's runtime lacks, as devtoolset's libstdc++_nonshared does). A
# post-build check fails the build if the module still carries a static runtime or needs symbol versions
# the interpreter's runtime does not define.
function(dgemma_use_shared_cxx_runtime target)
  if(NOT CMAKE_SYSTEM_NAME STREQUAL "Linux")
    return()
  endif()
  set(check "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/check_cxx_runtime.py")
  execute_process(COMMAND "${Python_EXECUTABLE}" "${check}" --find-runtime
                  OUTPUT_VARIABLE found OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
  string(REPLACE "\n" ";" runtime "${found}")
  if(NOT rc EQUAL 0)
    # No runtime found by the interpreter (unusual): the compiler's own shared libraries, if it has them.
    set(runtime "")
    foreach(lib libstdc++.so libgcc_s.so)
      execute_process(COMMAND "${CMAKE_CXX_COMPILER}" -print-file-name=${lib}
                      OUTPUT_VARIABLE path OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
      if(NOT rc EQUAL 0 OR NOT IS_ABSOLUTE "${path}" OR NOT EXISTS "${path}")
        message(FATAL_ERROR
          "dgemma: neither the interpreter (${Python_EXECUTABLE}) nor the C++ compiler (${CMAKE_CXX_COMPILER}) "
          "gives a shared ${lib}. dgemma._C must use the process's shared C++ runtime (torch's libstdc++.so.6); "
          "build with a compiler that ships one, e.g. CXX=/usr/bin/g++ CUDAHOSTCXX=/usr/bin/g++.")
      endif()
      list(APPEND runtime "${path}")
    endforeach()
  endif()
  message(STATUS "dgemma: C++ runtime ${runtime}")
  target_link_libraries(${target} PRIVATE ${runtime})
  add_custom_command(TARGET ${target} POST_BUILD
    COMMAND "${Python_EXECUTABLE}" "${check}" "$<TARGET_FILE:${target}>" --runtime ${runtime}
    COMMENT "dgemma: checking that ${target} links the shared C++ runtime" VERBATIM)
endfunction()
